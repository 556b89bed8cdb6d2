"""`stepflow demo`: the whole method in one command. The pipeline is stepflow_ext.demo; this module
gives it its options and the commands it runs (sweep, eval, analyze, compare), parsed and run as
`stepflow` runs them."""
from __future__ import annotations

from .. import demo
from . import analyze, compare, sweep
from . import eval as eval_command
from .common import RAW, command_parser, dispatch

STAGES = (sweep, eval_command, analyze, compare)


def run_command(argv) -> int:
    """`stepflow ARGV` for one stage of the demo, in this process: its exit status."""
    return dispatch(command_parser(STAGES), argv)


def cmd_demo(args) -> int:
    return demo.run(args, run_command)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", formatter_class=RAW, help="the whole method in one command (offline, on the embedded model)",
        description=demo.__doc__.split("\n\n", 1)[1] if demo.__doc__ else None,
        epilog="examples:\n"
               "  stepflow demo                      # embedded model and data, a few minutes on 2 CPU cores\n"
               "  stepflow demo --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --task math \\\n"
               "      --data math500_test.jsonl --dev math500_dev.jsonl --max-new-tokens 4096 --out runs/demo-r1\n")
    p.add_argument("--model", default=None, metavar="M",
                   help="a local directory or hub id (default: the embedded tiny reasoner)")
    p.add_argument("--data", default=None, metavar="FILE", help="test items, JSONL (default: the embedded test split)")
    p.add_argument("--dev", default=None, metavar="FILE", help="dev items the config is chosen on (needed with --data)")
    p.add_argument("--task", default="math", choices=("math", "mcq", "code"))
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default runs/demo; resumable)")
    p.add_argument("--per-length", type=int, default=6, metavar="K",
                   help="items per chain length when the items have a 'steps' field (default 6)")
    p.add_argument("--items", type=int, default=40, metavar="N",
                   help="items per split when they have no 'steps' field (default 40)")
    p.add_argument("--grid", default=demo.DEFAULT_GRID, help=f"the sweep's grid on dev (default {demo.DEFAULT_GRID!r})")
    p.add_argument("--traces", type=int, default=8, metavar="N",
                   help="baseline completions for the Step-Saliency pictures (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=320, metavar="N", help="default 320")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="default 16")
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="default | none | TEXT (default: none for the embedded model, which was trained on bare "
                        "questions; default otherwise)")
    p.add_argument("--steps", default=None, choices=("sentence", "paragraph"),
                   help="step rule (default: paragraph for the embedded model, whose steps are paragraphs without "
                        "sentence ends; sentence, the paper's, otherwise)")
    p.add_argument("--n-boot", type=int, default=10000, metavar="N", help="bootstrap resamples (default 10000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_demo)
