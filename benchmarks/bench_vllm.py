"""The vLLM backends against a bare ``vllm.LLM.generate``, against the transformers backend, and the reload cost.

Targets (issue: vLLM generation for the loop): :class:`~trl_hsstar.sampling.VLLMSampler` (the engine the trainer
owns, in a child process) at >= 0.9x the throughput of a bare ``LLM.generate`` over the same token ids, seeds and
sampling settings; the in-place reload per iteration against a fresh engine per iteration.

Every side gets the same request: ``--num-prompts`` toy prompts x ``--samples-per-prompt`` samples, prompts as
token ids, one seed per sample. The bare baseline (``benchmarks/vllm_bare.py``) times ``LLM.generate`` inside its
own process; the candidates are timed from this process, so they include tokenizing, the pipe or HTTP and
decoding the reply. All engines are started first and stay up; then the sides run in turn, ``--repeats`` rounds
after one warm-up each; medians.

    HSSTAR_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/bench_vllm.py --server
    python benchmarks/bench_vllm.py --vllm-python ... --server --output docs/benchmarks.md   # (re)write its section
    python benchmarks/bench_vllm.py --report-only --output docs/benchmarks.md   # the section from the record

The load average before and after is reported: run it on an otherwise idle machine. The figures go to a record
(``--results``, by default ``benchmarks/results/bench_vllm.json``), and the section is rendered from it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_methods import add_report_only, commit_line, publish, republish, script_meta

ROOT = Path(__file__).resolve().parents[1]
MARKS = ("<!-- bench_vllm:start -->", "<!-- bench_vllm:end -->")
RESULTS = "benchmarks/results/bench_vllm.json"
BARE = Path(__file__).with_name("vllm_bare.py")


class Bare:
    """The bare ``LLM.generate`` process; :meth:`run` returns (seconds, tokens) measured inside it."""

    def __init__(self, python: str, request: dict, env: dict, log: Path):
        from trl_hsstar.sampling.vllm_sampler import vllm_env

        path = log.with_suffix(".json")
        path.write_text(json.dumps(request))
        start = time.perf_counter()
        with open(log, "ab") as stderr:
            self.proc = subprocess.Popen(
                [python, str(BARE), str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=vllm_env(env),
                text=True,
            )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the bare vLLM process did not start; see {log}")
        self.start_seconds = time.perf_counter() - start

    def run(self) -> tuple[float, int]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["seconds"], reply["tokens"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(60)


def group_cpu(pgid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of every live process in process group ``pgid``, by pid."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            out[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class CPUAccount:
    """Where one side's time goes: the CPU seconds of this process and of each engine process group per run."""

    def __init__(self, groups: dict[str, int]):
        self.groups = groups
        self.runs: list[dict[str, float]] = []

    def __call__(self, run):
        def measured():
            before = {name: group_cpu(pgid) for name, pgid in self.groups.items()}
            cpu = time.process_time()
            result = run()
            row = {"wall": result[0], "this process": time.process_time() - cpu}
            for name, pgid in self.groups.items():
                after = group_cpu(pgid)
                leader = after.get(pgid, 0.0) - before[name].get(pgid, 0.0)
                rest = sum(v - before[name].get(pid, 0.0) for pid, v in after.items() if pid != pgid)
                row[f"{name}: leader"] = leader
                row[f"{name}: children"] = rest
            self.runs.append(row)
            return result

        return measured

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in self.runs) for k in self.runs[0]}


def one_request(client, ids: list[list[int]], n: int, fields: dict, seed: int) -> tuple[float, int]:
    """Every prompt in one ``/v1/completions`` request with one seed (the shape of TRL's ``VLLMClient.generate``):
    what the server costs without one request per prompt."""
    from trl_hsstar.sampling.vllm_server import _http

    body = {
        "model": client.model,
        "prompt": ids,
        "n": n,
        "temperature": fields["temperature"],
        "top_p": fields["top_p"],
        "max_tokens": fields["max_tokens"],
        "seed": seed,
        "return_token_ids": True,
    }
    start = time.perf_counter()
    reply = _http(client._session, "POST", f"{client.base_url}/v1/completions", body, client.request_timeout)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c["token_ids"]) for c in reply["choices"])


def timed(sampler, prompts, counts, params) -> tuple[float, int]:
    start = time.perf_counter()
    out = sampler.generate(prompts, counts, params)
    return time.perf_counter() - start, sum(c.num_tokens for cs in out for c in cs)


# vLLM's CPU defaults for the LLM class (a server gets half of each)
TUNED_SERVER_ARGS = ["--max-num-seqs", "256", "--max-num-batched-tokens", "4096"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default=os.environ.get("HSSTAR_VLLM_PYTHON"))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--reloads", type=int, default=6, help="in-place reloads timed, alternating 2 checkpoints"
    )
    parser.add_argument(
        "--server", action="store_true", help="also time VLLMServerSampler against a vllm server"
    )
    parser.add_argument(
        "--tuned-server",
        action="store_true",
        help="with --server, a second server given the LLM class's scheduler limits (vLLM's CPU defaults for a "
        "server are half of them: --max-num-seqs 128 and --max-num-batched-tokens 2048 against 256 and 4096)",
    )
    parser.add_argument("--output", type=Path, default=None, help="markdown file whose section to (re)write")
    parser.add_argument("--results", default=str(ROOT / RESULTS))
    add_report_only(parser)
    args = parser.parse_args(argv)
    output = None if args.output is None else str(args.output)
    if args.report_only:
        republish(render, results=args.results, output=output, marks=MARKS)
        return 0
    if not args.vllm_python:
        parser.error(
            "--vllm-python (or HSSTAR_VLLM_PYTHON): the interpreter of a virtual environment with vLLM"
        )
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from weights import perturbed_copy

    from trl_hsstar.sampling import SamplingParams, TransformersSampler, VLLMSampler
    from trl_hsstar.sampling.vllm_sampler import vllm_request
    from trl_hsstar.sampling.vllm_server import VLLMServerSampler, launch_vllm_server
    from trl_hsstar.toy import generate_problems
    from trl_hsstar.toy.world import toy_reasoner_path

    started = time.monotonic()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model_dir = Path(toy_reasoner_path())
    other = perturbed_copy(model_dir, work / "other")
    tok = AutoTokenizer.from_pretrained(model_dir)
    problems = generate_problems(args.num_prompts, operands=(2, 4), seed=0)
    prompts = [p.prompt for p in problems]
    counts = [args.samples_per_prompt] * len(prompts)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=0
    )
    _, ids, seeds, fields = vllm_request(tok, prompts, counts, params, [])
    cores = os.cpu_count() or 1
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(1, cores) - 1}",
    }
    engine = {"model": str(model_dir), "seed": 0, "enable_prefix_caching": True}

    sides: dict[str, object] = {}
    bare = Bare(
        args.vllm_python,
        {"engine": engine, "prompts": ids, "seeds": seeds, "params": fields},
        env,
        work / "bare.log",
    )
    sampler = VLLMSampler(
        model_dir,
        tok,
        python=args.vllm_python,
        engine_kwargs={k: v for k, v in engine.items() if k != "model"},
        env=env,
        log_path=work / "engine.log",
    )
    t = time.perf_counter()
    sampler.start()
    engine_start = time.perf_counter() - t
    engine_cpu = CPUAccount({"engine": sampler.pid})
    sides["bare LLM.generate"] = bare.run
    sides["VLLMSampler (child engine)"] = engine_cpu(lambda: timed(sampler, prompts, counts, params))
    server = client = server_start = None
    if args.server:
        server_env = {k: v for k, v in env.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        t = time.perf_counter()
        server = launch_vllm_server(
            model_dir,
            python=args.vllm_python,
            args=["--seed", "0", "--enable-prefix-caching"],
            env=server_env,
            log_path=work / "server.log",
        )
        server_start = time.perf_counter() - t
        client = VLLMServerSampler(server.url, tok)
        client.wait_ready()
        server_cpu = CPUAccount({"server": server.process.pid})
        sides["VLLMServerSampler (vllm serve, HTTP)"] = server_cpu(
            lambda: timed(client, prompts, counts, params)
        )
        sides["one request, all prompts (TRL's VLLMClient shape)"] = lambda: one_request(
            client, ids, args.samples_per_prompt, fields, 0
        )
    tuned = None
    if args.server and args.tuned_server:
        tuned = launch_vllm_server(
            model_dir,
            python=args.vllm_python,
            args=["--seed", "0", "--enable-prefix-caching", *TUNED_SERVER_ARGS],
            env=server_env,
            log_path=work / "server-tuned.log",
        )
        tuned_client = VLLMServerSampler(tuned.url, tok)
        tuned_client.wait_ready()
        tuned_cpu = CPUAccount({"server": tuned.process.pid})
        sides[f"VLLMServerSampler, `{' '.join(TUNED_SERVER_ARGS)}`"] = tuned_cpu(
            lambda: timed(tuned_client, prompts, counts, params)
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    hf = TransformersSampler(model, tok, batch_size=64, progress=False)
    sides["TransformersSampler (generate)"] = lambda: timed(hf, prompts, counts, params)

    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in sides}
    for run in sides.values():  # warm-up
        run()
    names = list(sides)
    for r in range(
        args.repeats
    ):  # the order rotates every round, so that no side always follows the same one
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(sides[name]())

    reloads = [sampler.load_weights(other if i % 2 == 0 else model_dir) for i in range(args.reloads)]
    server_reloads = (
        [client.load_weights(str(other if i % 2 == 0 else model_dir)) for i in range(args.reloads)]
        if client
        else []
    )
    # the fallback: a fresh engine per iteration (close, start on the new checkpoint)
    t = time.perf_counter()
    sampler.close()
    fresh = VLLMSampler(
        other, tok, python=args.vllm_python, engine_kwargs={"seed": 0}, env=env, log_path=work / "fresh.log"
    )
    fresh.start()
    fresh_seconds = time.perf_counter() - t
    fresh.close()
    bare.close()
    for launched in (server, tuned):
        if launched is not None:
            launched.close()
    load_after = os.getloadavg()

    accounts = {"child engine": engine_cpu.medians()}
    if server is not None:
        accounts["server"] = server_cpu.medians()
    if tuned is not None:
        accounts["tuned server"] = tuned_cpu.medians()
    record = {
        "meta": script_meta(
            "bench_vllm.py",
            argv,
            started,
            cores=cores,
            load_before=load_before[:2],
            load_after=load_after[:2],
            transformers=transformers.__version__,
            python=platform.python_version(),
        ),
        "settings": {
            k: getattr(args, k)
            for k in (
                "num_prompts",
                "samples_per_prompt",
                "max_new_tokens",
                "temperature",
                "top_p",
                "repeats",
            )
        }
        | {"reloads": args.reloads, "tuned_server_args": TUNED_SERVER_ARGS},
        "runs": runs,  # side: [seconds, tokens] per round
        "reload_seconds": reloads,
        "server_reload_seconds": server_reloads,
        "engine_start_seconds": engine_start,
        "server_start_seconds": server_start,
        "bare_start_seconds": bare.start_seconds,
        "fresh_engine_seconds": fresh_seconds,
        "cpu_accounts": accounts,
    }
    publish(render, record, results=args.results, output=output, marks=MARKS)
    return 0


def render(record: dict) -> str:
    """The docs section, from the record alone."""
    meta, args, runs = record["meta"], argparse.Namespace(**record["settings"]), record["runs"]
    reloads, server_reloads = record["reload_seconds"], record["server_reload_seconds"]
    accounts, cores = record["cpu_accounts"], meta["cores"]
    tuned_args = " ".join(args.tuned_server_args)
    n = args.num_prompts * args.samples_per_prompt
    base = statistics.median(s for s, _ in runs["bare LLM.generate"])
    base_best = min(s for s, _ in runs["bare LLM.generate"])
    rows = []
    for name, values in runs.items():
        secs = statistics.median(s for s, _ in values)
        best = min(s for s, _ in values)
        toks = statistics.median(k for _, k in values)
        rows.append(
            f"| {name} | {secs:.3f} ({best:.3f} - {max(s for s, _ in values):.3f}) | "
            f"{n / secs:.0f} | {toks / secs:.0f} | **{base / secs:.2f}x** | {base_best / best:.2f}x |"
        )
    med = {name: statistics.median(sec for sec, _ in values) for name, values in runs.items()}
    ratio = med["TransformersSampler (generate)"] / med["VLLMSampler (child engine)"]
    comparison = (
        f"The child engine ran at {ratio:.2f}x the throughput of the transformers backend on this request "
        "(batch 64, the same prompts and settings)."
    )
    if "server" in accounts:
        e, v = accounts["child engine"], accounts["server"]
        comparison += (
            "\n\nWhere the time goes (median CPU seconds per run, from `/proc`; the sides share "
            f"{cores} cores): the child engine side took {e['wall']:.2f} s of wall time, with "
            f"{e['this process']:.2f} s of CPU in this process (tokenizing, the pipe, decoding) and "
            f"{e['engine: leader'] + e['engine: children']:.2f} s in the engine. The server side took "
            f"{v['wall']:.2f} s, with {v['this process']:.2f} s in this process (HTTP client, one request per "
            f"prompt), {v['server: leader']:.2f} s in the API server process (HTTP, JSON, detokenizing) and "
            f"{v['server: children']:.2f} s in its engine-core process. One request for every prompt (with one "
            "seed for all, as TRL's `VLLMClient.generate` sends) is the server without the per-prompt requests."
        )
    if "tuned server" in accounts:
        t_acc = accounts["tuned server"]
        comparison += (
            f" The server given the LLM class's scheduler limits (`{tuned_args}`; vLLM's CPU "
            "defaults for a server are 128 and 2048) took "
            f"{t_acc['wall']:.2f} s, {t_acc['server: children']:.2f} s of it in its engine-core process."
        )
    reload_line = (
        f"In-place reload of a new checkpoint (`VLLMSampler.load_weights`: `hsstar_reload` in the engine, tied "
        f"embeddings re-tied, prefix cache reset), median of {args.reloads}: **{statistics.median(reloads):.3f} s** "
        f"(min {min(reloads):.3f}, max {max(reloads):.3f})"
    )
    if server_reloads:
        reload_line += (
            f"; through the server's dev endpoints (`VLLMServerSampler.load_weights`): "
            f"**{statistics.median(server_reloads):.3f} s**"
        )
    reload_line += (
        f". The fallback, a fresh engine per iteration (close, then start on the new checkpoint): "
        f"**{record['fresh_engine_seconds']:.1f} s**. First start of the child engine: "
        f"{record['engine_start_seconds']:.1f} s"
    )
    if record["server_start_seconds"] is not None:
        reload_line += f"; of the server: {record['server_start_seconds']:.1f} s"
    load_before, load_after = meta["load_before"], meta["load_after"]
    return f"""{MARKS[0]}
## vLLM backends (`benchmarks/bench_vllm.py`)

Target: `VLLMSampler` (the engine the trainer owns, in a child process under the vLLM environment's interpreter)
at >= 0.9x the throughput of a bare `vllm.LLM.generate` on the same request. Every side gets the same
{args.num_prompts} toy prompts x {args.samples_per_prompt} samples = {n} samples (prompts as token ids, one seed
per sample, temperature {args.temperature}, top-p {args.top_p}, `max_new_tokens={args.max_new_tokens}`), on the
toy reasoner (hidden 64; the vLLM sides in vLLM's default dtype for it, bfloat16 on this CPU, the
transformers side in float32). The bare baseline is timed inside its own process; the candidates from the
training process, so they include tokenizing, the pipe (or HTTP) and decoding. All engines stay up; the sides run
in turn (the order rotating each round; with every engine up on two cores the spread is wide, so the best runs are the
cleaner comparison), {args.repeats} rounds after one warm-up each. The ratio is of throughputs
(bare seconds / side seconds), of the medians and of the best runs.

```bash
{meta["command"]}
```

{commit_line(meta)} `--vllm-python` (or `HSSTAR_VLLM_PYTHON`) names the interpreter of a venv with vLLM's CPU build.

| side | seconds per run (min - max) | samples/s | tokens/s | side / bare, medians | best runs |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{reload_line}.

{comparison}
Environment: {meta["machine"]}, vLLM's CPU build (`vllm-cpu`) with `VLLM_CPU_OMP_THREADS_BIND=0-{cores - 1}`,
`VLLM_CPU_KVCACHE_SPACE=1`; this process `torch.get_num_threads()` = {meta["threads"]}; load average
(1 / 5 min) {load_before[0]:.2f} / {load_before[1]:.2f} before, {load_after[0]:.2f} / {load_after[1]:.2f} after;
torch {meta["torch"]}, transformers {meta["transformers"]}, Python {meta["python"]}.
{MARKS[1]}"""


if __name__ == "__main__":
    sys.exit(main())
