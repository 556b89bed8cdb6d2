"""StepFlow on a Hugging Face model: generate with the intervention, then Step-Saliency on the trace.

    python examples/hf_quickstart.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    python examples/hf_quickstart.py            # offline: a tiny random Qwen2 and a BPE tokenizer

This is the README's example, runnable. With no --model it builds a random 4-layer Qwen2 and a
byte-level BPE tokenizer (with "\\n\\n" and "</think>" tokens) so the whole flow runs offline;
its outputs are noise, but every step is the one a real model goes through.
"""
import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stepflow_ext as sf


CANNED_TRACE = ("First, 12 + 7 means adding seven to twelve.\n\nSo 12 + 7 = 19, which is the sum.\n\n"
                "Check: 19 - 7 = 12, as it should be.</think> The answer is \\boxed{19}.")


def tiny_offline_model():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from hf_models import model, tokenizer

    return model("qwen2", sharpen=6.0), tokenizer()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local directory or hub id of a causal LM (default: tiny random offline model)")
    ap.add_argument("--prompt", default="What is 12 + 7? Reason step by step.")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="saliency.png", help="where to write the heatmaps")
    args = ap.parse_args()

    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    else:
        model, tok = tiny_offline_model()

    if tok.chat_template:
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                         tokenize=False)
        if not prompt.rstrip().endswith("<think>"):
            prompt += "<think>\n"  # open the thinking where the template does not (R1-Distill's does)
    else:
        prompt = args.prompt + " <think>"
    inputs = tok([prompt], return_tensors="pt", add_special_tokens=False)
    config = sf.StepFlowConfig.default_for(model)                  # the paper's configuration (Table 8)
    print(config.describe())
    with sf.replace_attention(model, config, tokenizer=tok) as handle:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        print("StepFlow acted (per layer):", handle.trigger_counts())
        seg = handle.segmentation(out)                               # steps placed online, as generated
        print(tok.decode(out[0, inputs["input_ids"].shape[1]:]))
        print(seg)
        if seg.num_steps(0) < 2 or "summary" not in seg.kinds[0]:
            # A random model writes no sentences or "</think>": analyze a canned trace instead.
            print("(the generated trace has too few steps; analyzing a canned trace instead)")
            text = prompt + CANNED_TRACE
            out = tok([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
            seg = sf.segment(out, [inputs["input_ids"].shape[1]], tokenizer=tok, model=model)
        # The paper's Step-Saliency of the intervened model on the trace.
        res = sf.step_saliency(model, out, seg, preset="paper")
    report = res.diagnose()[0]
    print("the paper's FB/AB per layer:", [round(x, 3) for x in report["final_heat_anomaly"]])
    print("lock-in index per layer:", [round(x, 3) for x in report["lock_in_index"]])
    res.plot(args.out)
    print("heatmaps written to", args.out)


if __name__ == "__main__":
    main()
