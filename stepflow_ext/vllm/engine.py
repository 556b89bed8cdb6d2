"""The vLLM engine of `stepflow eval --engine vllm` and `stepflow generate --engine vllm`.

`VLLMGenerator` completes the evaluation's requests (objects with prompt_ids and seed, as
eval.runner.Request) with one offline `vllm.LLM`, steered through the plugin when a StepFlow config
is given, and returns the same per-sample fields as the HF engine's generator: completion, tokens,
finish, steps, summary, time_s. Greedy decoding gives the same tokens as the HF engine up to
floating-point ties; sampling uses vLLM's per-request seeds (rows differ from the HF engine's,
which is why the engine is part of a run's settings).
"""
from __future__ import annotations

import time
from types import SimpleNamespace

from .request import steer


def model_config(path: str, trust_remote_code: bool = False):
    """The Hugging Face config of the served model (its layer count decides `default`)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def num_layers(config) -> int:
    """Decoder layers of a Hugging Face config (its text config for multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def check_available() -> None:
    """A clear error when vLLM is missing (the project's tests and CI install it in .venv-vllm)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("vLLM is not installed beside stepflow-ext (CPU: `make vllm-venv`, see "
                         "docs/vllm.md; CUDA: pip install vllm)")


class VLLMGenerator:
    """Completes batches of requests with vLLM (the plugin applies `config` to every request)."""

    def __init__(self, model: str, tokenizer, settings, eos_ids: set, config=None, *, dtype="auto",
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, max_model_len: int | None = None,
                 trust_remote_code: bool = False, hf_config=None, llm=None, **llm_options):
        check_available()
        from vllm import LLM

        self.tok, self.settings, self.eos, self.config = tokenizer, settings, set(eos_ids), config
        # what segment()'s "auto" markers read (model_type); hf_config: the caller's, if it loaded one
        self.rule_model = SimpleNamespace(config=hf_config or model_config(model, trust_remote_code))
        if llm is None:
            llm = LLM(model=model, dtype=dtype, seed=settings.seed, tensor_parallel_size=tensor_parallel_size,
                      data_parallel_size=data_parallel_size, max_model_len=max_model_len,
                      trust_remote_code=trust_remote_code, **llm_options)
        self.llm = llm
        self.extra_args = steer(config, **settings.segmentation()) if config is not None else None

    def params(self, request):
        from vllm import SamplingParams

        s = self.settings
        sampling = s.temperature > 0
        return SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature if sampling else 0.0,
                              top_p=s.top_p if sampling else 1.0, top_k=-1 if sampling else 0,
                              seed=request.seed if sampling else None, stop_token_ids=sorted(self.eos),
                              skip_special_tokens=False, detokenize=False, extra_args=self.extra_args)

    def token_ids(self, requests) -> list[list[int]]:
        """The generated token ids of each request (stop token included)."""
        outputs = self.llm.generate([{"prompt_token_ids": list(r.prompt_ids)} for r in requests],
                                    [self.params(r) for r in requests], use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def __call__(self, requests) -> list[dict]:
        import torch

        from ..segment import segment

        s, tok = self.settings, self.tok
        start = time.perf_counter()
        generated = self.token_ids(requests)
        elapsed = (time.perf_counter() - start) / max(1, len(requests))
        rule = dict(s.segmentation(), model=self.rule_model)
        results = []
        for r, gen in zip(requests, generated):
            cut = next((i for i, t in enumerate(gen) if t in self.eos), None)
            text_ids = gen[:cut] if cut is not None else gen
            gen = gen[:cut + 1] if cut is not None else gen
            seg = segment(torch.tensor([list(r.prompt_ids) + gen]), [len(r.prompt_ids)], tokenizer=tok, **rule)
            kinds = seg.kinds[0]
            results.append({"completion": tok.decode(text_ids, skip_special_tokens=False,
                                                     clean_up_tokenization_spaces=False),
                            "tokens": len(gen), "finish": "eos" if cut is not None else "length",
                            "steps": kinds.count("step"), "summary": "summary" in kinds,
                            "time_s": round(elapsed, 4), "control_batch_seed": None})
        return results
