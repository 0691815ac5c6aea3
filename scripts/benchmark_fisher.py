"""Cost of the Fisher engine against one plain batched forward + backward, a `torch.func` vmap implementation and a
per-sample loop, on dense, convolutional, mixture-of-experts and encoder-decoder models. Every ratio in the table comes
from this one run. (The mixture-of-experts and T5 rows send their routers and experts, and T5's relative-position
tables, through the engine's exact per-sample path; see docs/fisher-engine.md.)

    python scripts/benchmark_fisher.py                       # CPU, 2 threads (this project's machine)
    python scripts/benchmark_fisher.py --device cuda         # a GPU
    python scripts/benchmark_fisher.py --quick               # tiny sizes: checks that it runs (the test suite does)

Timing: each method runs the same batches; methods alternate over `--rounds` rounds and the median round counts,
so that load on a shared machine hits all methods alike. Memory: on CUDA the peak allocated during a method's
pass above what the model and batches hold; on CPU the growth of the resident set (sampled every millisecond)
during one cold pass in a fresh process that runs only that method (so it includes allocator slack).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the engine's progress bar would interleave with the table

import torch  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402


MODELS = ("mlp-digits", "cnn-digits", "bert-minilm", "gpt2-small", "mixtral-moe", "t5-small")
METHODS = ("plain", "engine", "vmap", "loop")


@dataclass
class Case:
    name: str
    description: str
    model: torch.nn.Module
    batches: list[dict[str, torch.Tensor]]
    shift: bool = True  # token-level logits at t predict label t + 1 (causal LM); an encoder-decoder's predict t


class DigitsMLP(torch.nn.Module):
    """Flattened 8x8 digits -> 256 -> 256 -> 10 classes, returning `.logits` like a transformers model."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    def forward(self, pixel_values):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.layers(pixel_values))


def build_case(name: str, quick: bool, device: str) -> Case:
    """The model (built from a config, seeded) and its batches."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    num_batches = 2 if quick else 4
    if name in ("mlp-digits", "cnn-digits"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).div(16)
        if name == "mlp-digits":
            model = DigitsMLP()
            description = "MLP 64-256-256-10 on 8x8 digits"
        else:
            from transformers import ResNetConfig, ResNetForImageClassification

            config = ResNetConfig(
                num_channels=3,
                embedding_size=16,
                hidden_sizes=[32, 64],
                depths=[1, 1],
                layer_type="basic",
                num_labels=10,
            )
            model = ResNetForImageClassification(config)
            images = images.unsqueeze(1).expand(-1, 3, -1, -1)
            description = "ResNet (conv 16-32-64, BatchNorm) on 8x8 digits"
        labels = torch.tensor(digits.target)
        size, num_batches = (8, 2) if quick else (128, 8)
        batches = [
            {"pixel_values": images[i * size : (i + 1) * size], "labels": labels[i * size : (i + 1) * size]}
            for i in range(num_batches)
        ]
        description += f", batch {size}"
    elif name == "bert-minilm":
        from transformers import BertConfig, BertForSequenceClassification

        hidden, layers, length, size = (64, 2, 32, 4) if quick else (384, 6, 128, 32)
        config = BertConfig(
            vocab_size=30522,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 32,
            intermediate_size=4 * hidden,
            num_labels=2,
            attn_implementation="eager",
        )
        model = BertForSequenceClassification(config)
        batches = []
        for _ in range(num_batches):
            lengths = torch.randint(length // 8, length + 1, (size,), generator=generator)
            mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
            ids = torch.randint(1000, 30522, (size, length), generator=generator) * mask
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (size,))})
        description = f"BERT {layers} layers, hidden {hidden} (MiniLM-sized), length {length} padded, batch {size}"
    elif name == "gpt2-small":
        from transformers import GPT2Config, GPT2LMHeadModel

        embd, layers, length, size = (32, 1, 32, 4) if quick else (256, 4, 128, 16)
        config = GPT2Config(n_embd=embd, n_layer=layers, n_head=4, n_positions=length, attn_implementation="eager")
        model = GPT2LMHeadModel(config)
        batches = []
        for _ in range(num_batches):
            ids = torch.randint(0, config.vocab_size, (size, length), generator=generator)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        description = f"GPT-2 {layers} layers, hidden {embd}, vocab 50257 tied, length {length}, batch {size}"
    elif name == "mixtral-moe":
        from transformers import MixtralConfig, MixtralForCausalLM

        hidden, layers, length, size = (32, 1, 16, 4) if quick else (128, 2, 64, 8)
        config = MixtralConfig(
            vocab_size=1000,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=length,
            attn_implementation="eager",
        )
        model = MixtralForCausalLM(config)
        batches = []
        for _ in range(num_batches):
            ids = torch.randint(0, config.vocab_size, (size, length), generator=generator)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        description = (
            f"Mixtral {layers} layers, hidden {hidden}, 4 experts (top 2), vocab 1000, length {length}, batch {size}"
        )
    elif name == "t5-small":
        from transformers import T5Config, T5ForConditionalGeneration

        d_model, layers, source, target, size = (32, 1, 16, 8, 4) if quick else (128, 2, 64, 16, 16)
        config = T5Config(
            vocab_size=1000,
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=layers,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        model = T5ForConditionalGeneration(config)
        batches = []
        for _ in range(num_batches):
            ids = torch.randint(1, config.vocab_size, (size, source), generator=generator)
            labels = torch.randint(1, config.vocab_size, (size, target), generator=generator)
            decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
            batches.append(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": decoder_ids}
                | {"labels": labels}
            )
        description = f"T5 {layers}+{layers} layers, d_model {d_model}, source {source}, target {target}, batch {size}"
    else:
        raise SystemExit(f"--models: got {name!r}; expected some of {', '.join(MODELS)}.")
    model = model.to(device).eval()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    return Case(
        name,
        description,
        model,
        batches,
        shift=not getattr(getattr(model, "config", None), "is_encoder_decoder", False),
    )


def _log_likelihood(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    from hf_deepclean.fisher.engine import sample_log_likelihoods

    return sample_log_likelihoods(logits, labels, shift)


def run_plain(case: Case) -> None:
    """One batched forward + backward of the summed log-likelihood: the cost floor."""
    for p in case.model.parameters():
        p.requires_grad_(True)
    for batch in case.batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        case.model.zero_grad(set_to_none=True)
        _log_likelihood(case.model(**inputs).logits, batch["labels"], case.shift).sum().backward()
    case.model.zero_grad(set_to_none=True)


def run_engine(case: Case) -> None:
    from hf_deepclean.fisher.engine import accumulate_fisher_sums

    accumulate_fisher_sums(case.model, case.batches, desc=case.name)


def run_loop(case: Case) -> None:
    """One backward per sample, trailing padding trimmed (the project's first implementation)."""
    params = dict(case.model.named_parameters())
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    for batch in case.batches:
        for n in range(batch["labels"].shape[0]):
            sample = {k: v[n : n + 1] for k, v in batch.items()}
            if "attention_mask" in sample and "decoder_input_ids" not in sample:
                length = int(sample["attention_mask"][0].nonzero()[-1]) + 1
                sample = {k: v[:, :length] if v.dim() == 2 else v for k, v in sample.items()}
            labels = sample.pop("labels")
            value = _log_likelihood(case.model(**sample).logits, labels, case.shift).sum()
            for total, g in zip(sums.values(), torch.autograd.grad(value, list(params.values()))):
                total.add_(g.square())


def run_vmap(case: Case) -> None:
    """`vmap(grad)` over samples of the whole model (masks passed as ready 4-D additive masks)."""
    params = {k: p.detach() for k, p in case.model.named_parameters()}
    sums = {k: torch.zeros_like(p) for k, p in params.items()}

    def log_likelihood(values, sample):
        sample = {k: v.unsqueeze(0) for k, v in sample.items()}
        labels = sample.pop("labels")
        return _log_likelihood(functional_call(case.model, values, (), sample).logits, labels, case.shift).sum()

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0))
    for batch in case.batches:
        batch = dict(batch)
        if "attention_mask" in batch and not case.shift and bool(batch["attention_mask"].all()):
            batch.pop("attention_mask")  # unpadded sources: the same as no mask (T5 takes no 4-D one for both stacks)
        if "attention_mask" in batch:
            mask = batch.pop("attention_mask")
            additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            batch["attention_mask"] = additive.expand(-1, 1, mask.shape[1], -1).contiguous()
        for total, g in zip(sums.values(), per_sample(params, batch).values()):
            total.add_(g.square().sum(0))


RUNNERS = {"plain": run_plain, "engine": run_engine, "vmap": run_vmap, "loop": run_loop}


def timed(runner, case: Case, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    runner(case)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(case_name: str, method: str, args) -> float | None:
    """Peak extra memory of one pass of `method`, in MiB (see the module docstring for how)."""
    if args.device == "cuda":
        case = build_case(case_name, args.quick, "cuda")
        RUNNERS[method](case)  # warm-up (kernels, workspaces)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        RUNNERS[method](case)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    command = [sys.executable, __file__, "--memory-worker", case_name, method, "--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(case_name: str, method: str, quick: bool) -> None:
    """One cold pass of `method` in this fresh process; a thread samples the resident set every millisecond."""
    import threading

    case = build_case(case_name, quick, "cpu")
    base = _resident_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    RUNNERS[method](case)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _resident_bytes())
    print(json.dumps({"peak_mb": (peak[0] - base) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that everything runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(*args.memory_worker, args.quick)
        return
    methods = args.methods.split(",")
    rounds = 1 if args.quick else args.rounds
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"# Fisher engine benchmark on {device_name}; torch {torch.__version__}; median of {rounds} rounds\n")
    print(
        "| model | plain fwd+bwd (s) | engine / plain | vmap / plain | loop / plain | peak extra MiB (plain / engine / vmap / loop) |"
    )
    print("|---|---|---|---|---|---|")
    results = []
    notes = []
    for name in args.models.split(","):
        case = build_case(name, args.quick, args.device)
        failed = {}
        for method in methods:  # warm-up; a method that cannot run this model (vmap on data-dependent routing) fails
            try:
                RUNNERS[method](case)
            except Exception as error:  # noqa: BLE001 - reported in the row's note
                failed[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
        ran = [method for method in methods if method not in failed]
        times = {method: [] for method in ran}
        for _ in range(rounds):
            for method in ran:
                times[method].append(timed(RUNNERS[method], case, args.device))
        median = {method: statistics.median(values) for method, values in times.items()}
        memory = {}
        if not args.no_memory:
            memory = {method: peak_memory_mb(name, method, args) for method in ran}
        row = {"model": name, "description": case.description, "seconds": median, "peak_mb": memory, "failed": failed}
        row["ratio"] = {method: median[method] / median["plain"] for method in ran}
        row["spread"] = {method: (min(v) / median["plain"], max(v) / median["plain"]) for method, v in times.items()}
        results.append(row)

        def cell(method, row=row):
            if method in row["failed"]:
                return "fails"
            return f"{row['ratio'][method]:.2f}" if method in row["ratio"] else "-"

        mem = " / ".join(
            "-" if memory.get(m) is None else f"{memory[m]:.0f}" for m in ("plain", "engine", "vmap", "loop")
        )
        plain = f"{median['plain']:.3f}" if "plain" in median else "-"
        print(f"| {case.description} | {plain} | {cell('engine')} | {cell('vmap')} | {cell('loop')} | {mem} |")
        notes += [f"- {case.description}: {method} fails ({reason})" for method, reason in failed.items()]
        sys.stdout.flush()
    if notes:
        print("\n" + "\n".join(notes))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, "rounds": rounds, "rows": results}, handle)


if __name__ == "__main__":
    main()
