"""`hf-deepclean push` and `--push_to_hub`: publish a finished output folder to the Hub as one commit whose
message comes from the folder's own reports.

Pushing uses the token from the usual `huggingface_hub` sources (`HF_TOKEN`, `hf auth login`); it is never
passed around, logged or written by this package. A push that fails leaves the local folder as it was, so
`hf-deepclean push OUTPUT_DIR --hub_model_id ORG/NAME` can retry it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, get_token

from ..errors import DeepCleanError, DeepCleanRunError
from ..records import SUMMARY_METRICS, ResetRecord, RunRecord, UnlearningResults
from .model_card import display_name
from .output import CONFIG_NAME, RESULTS_NAME


logger = logging.getLogger(__name__)


def check_hub_token() -> None:
    """Fail before any work when a push is requested but no Hugging Face token can be found."""
    if get_token() is None:
        raise DeepCleanError(
            "--push_to_hub: no Hugging Face token found; expected the HF_TOKEN environment variable or a saved "
            "login (`hf auth login`)."
        )


def read_reports(output_dir: str | os.PathLike) -> tuple[RunRecord, UnlearningResults]:
    """The `deepclean_config.json` and `deepclean_results.json` records of an output folder.

    Raises:
        DeepCleanError: when the folder is not a complete `hf_deepclean` output folder.
    """
    folder = Path(output_dir)
    try:
        config, results = (json.loads((folder / name).read_text()) for name in (CONFIG_NAME, RESULTS_NAME))
        return RunRecord.from_dict(config), UnlearningResults.from_dict(results)
    except (OSError, ValueError, KeyError, TypeError):
        raise DeepCleanError(
            f"output_dir: {str(folder)!r} is not an hf_deepclean output folder (it needs {CONFIG_NAME} and "
            f"{RESULTS_NAME}); expected the --output_dir of an `hf-deepclean unlearn` run."
        ) from None


def commit_message(config: RunRecord, results: UnlearningResults) -> tuple[str, str]:
    """Summary line and description of the commit that publishes a run: what was forgotten, how, how well.

    Only counts, the forget hash, settings and metrics appear: never rows, ids or local paths.
    """
    args, forget = config.arguments, config.forget
    total = results.reset.statistics.total
    before, after = results.metrics_before, results.metrics_after
    summary = f"DeepClean: forget {forget.num_rows} rows of {display_name(args['dataset_name'])}"
    if "forget_accuracy" in after:
        summary += f", forget_accuracy {before['forget_accuracy']:.3f} -> {after['forget_accuracy']:.3f}"
    lines = [
        f"Base model: {display_name(args['model_name_or_path'])} (revision {args['revision']}).",
        f"Forget set: {forget.num_rows} rows of split {forget.split} ({forget.kind} specification), "
        f"sha256 {forget.sha256}.",
        f"Reset {total.reset} of {total.numel} weights ({total.share:.2%}; {results.reset.selection_rule}"
        f", reset={results.reset.mode}{_base_model(results.reset)}), repaired for {args['repair_epochs']} epochs.",
        "Metrics (before -> after): "
        + ", ".join(f"{key} {before[key]:.4f} -> {after[key]:.4f}" for key in SUMMARY_METRICS if key in after)
        + ".",
        f"Written by hf_deepclean {config.library_versions.get('hf_deepclean', 'unknown')}.",
    ]
    return summary, "\n".join(lines)


def _base_model(reset: ResetRecord) -> str:
    """`--reset base` names the model it reset to (as the card does: a Hub id, or a local folder's name)."""
    if reset.mode != "base" or not reset.base_model:
        return ""
    return f" to {display_name(reset.base_model)}"


def _one_line(error: BaseException) -> str:
    """The first line of an error, with the token masked should a library ever echo it."""
    lines = str(error).strip().splitlines()
    text = next((line.strip() for line in lines if line.strip()), type(error).__name__)
    token = get_token()
    return text.replace(token, "***") if token else text


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
) -> CommitInfo:
    """Create the repository if needed and upload an output folder in one commit.

    Args:
        output_dir: an `hf_deepclean` output folder (model, card, plots and reports).
        repo_id: `ORG/NAME`, or `NAME` under the token's account.
        private: visibility of a repository created here (an existing repository keeps its own).
        revision: branch to commit to; created from `main` when missing. Default: `main`.

    Returns:
        The commit; `commit_url` links to it.

    Raises:
        DeepCleanError: when the folder is not an output folder or no token is found.
        DeepCleanRunError: when the Hub refuses or cannot be reached; the local folder is left as it was.
    """
    folder = Path(output_dir)
    config, results = read_reports(folder)
    check_hub_token()
    summary, description = commit_message(config, results)
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=revision,
            commit_message=summary,
            commit_description=description,
        )
    except Exception as error:  # network, auth, server: every failure becomes one line with the way to retry
        retry = ["hf-deepclean", "push", str(folder), "--hub_model_id", repo_id]
        retry += ["--hub_revision", revision] if revision else []
        retry += [] if private else ["--hub_private_repo", "false"]
        raise DeepCleanRunError(
            f"--hub_model_id: could not push to {repo_id!r} ({type(error).__name__}: {_one_line(error)}); the local "
            f"folder {str(folder)!r} is intact, retry with `{shlex.join(retry)}`."
        ) from error
    logger.info(f"Pushed {folder} to {repo_id}: {commit.commit_url}")
    return commit
