"""The pipeline: load a session, run DeepClean on it, evaluate, save and publish.

Modules: `session` (loading), `deepclean` (the method on loaded rows), `unlearn` (what `hf-deepclean unlearn` runs),
`fisher_sums` (`hf-deepclean fisher`), `assessment` (`hf-deepclean evaluate`).
"""
