"""The embedded tiny reasoner: a small reasoning model the project trains and ships.

- `tasks`: the task family (variable-substitution chains with a `steps` difficulty knob),
  rendered as question -> <think> steps separated by "\\n\\n" </think> -> boxed summary, and
  its train/dev/test JSONL splits (test adds chains longer than any trained on).
- `tokenizer`: the byte-level BPE tokenizer ("\\n\\n", "<think>", "</think>" single tokens)
  and the chat template.
- `model`: the architecture, `load_default()` of the packaged weights, greedy solving.

Training: scripts/train_tiny_reasoner.py. Use `stepflow_ext.load_default()`.
"""
