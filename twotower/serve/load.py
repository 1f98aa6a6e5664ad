"""A load test for `twotower serve`: N concurrent clients (asyncio + httpx) send chat requests
for a while (greedy, or with --mixed a different sampling setting per prompt); aggregate
tokens/s, time to first token, errors, and whether every reply equals the same request's reply
sent alone.

    python -m twotower.serve.load http://127.0.0.1:8000 --clients 1,8,32 --seconds 60 --modes ar,verify --out load.json

Each client streams its requests (so time to first token is the client's own), cycling over
the built-in evaluation prompts; a reference pass first sends every request alone, one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time

import httpx

GREEDY = {"temperature": 0}
# --mixed: prompt i is sent with MIXED[i % 4], seeded with i where it samples
MIXED = (
    GREEDY,
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.0, "top_k": 40},
    {"temperature": 0, "top_p": 0.5},
)


def requests(prompts: list[str], mixed: bool, ignore_eos: bool = False) -> list[tuple[str, dict]]:
    """(prompt, sampling fields) of each request a client cycles over."""
    sampling = [MIXED[i % len(MIXED)] if mixed else GREEDY for i in range(len(prompts))]
    sampling = [s | {"seed": i} if s["temperature"] else s for i, s in enumerate(sampling)]
    return [(p, s | {"ignore_eos": True} if ignore_eos else s) for p, s in zip(prompts, sampling)]


async def _one(client: httpx.AsyncClient, url: str, request: tuple[str, dict], mode: str, max_tokens: int) -> dict:
    prompt, sampling = request
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "mode": mode, **sampling,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    begin, first, text, tokens, stamps = time.perf_counter(), None, [], 0, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=1200) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    stamps.append(time.perf_counter())
                    text.append(piece)
    end = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "ttft": (first or end) - begin, "seconds": end - begin, "stamps": stamps}


async def _long_prompt(client: httpx.AsyncClient, url: str, tokens: int, after: float) -> dict:
    """After `after` seconds, one completion whose prompt is `tokens` token ids (one token back):
    when it was sent and answered."""
    await asyncio.sleep(after)
    prompt = [5 + (7 * i) % 80 for i in range(tokens)]  # ids every vocabulary holds
    begin = time.perf_counter()
    r = await client.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=1800)
    return {"tokens": tokens, "status": r.status_code, "begin": begin, "end": time.perf_counter()}


def quantile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[int(q * (len(values) - 1))], 4) if values else None


def gaps(results: list[dict], window: tuple[float, float] | None = None, inside: bool = True) -> list[float]:
    """The gaps between a stream's text chunks (each request's own), those that end inside (or
    outside) `window`."""
    out = []
    for r in results:
        stamps = r.get("stamps", [])
        for a, b in itertools.pairwise(stamps):
            if window is None or (window[0] <= b <= window[1]) == inside:
                out.append(b - a)
    return out


async def load(url: str, jobs: list[tuple[str, dict]], mode: str, clients: int, seconds: float, max_tokens: int,
               reference: list[str] | None = None, long_prompt: int = 0) -> dict:  # fmt: skip
    """`clients` concurrent clients for `seconds`; each client sends the requests in turn. With
    long_prompt, one more request with a prompt of that many tokens arrives after 2 s: the
    streams' chunk gaps while it is read are reported beside the others."""
    results, stop_at, long = [], time.perf_counter() + seconds, None
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(k: int):
            i = k
            while time.perf_counter() < stop_at or (long is not None and not long.done()):
                out = await _one(client, url, jobs[i % len(jobs)], mode, max_tokens)
                out["request"] = i % len(jobs)
                results.append(out)
                i += clients

        begin = time.perf_counter()
        if long_prompt:
            long = asyncio.create_task(_long_prompt(client, url, long_prompt, after=2.0))
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - begin
    ok = [r for r in results if "error" not in r]
    mismatched = sum(1 for r in ok if reference is not None and reference[r["request"]] != r["text"])
    ttft = sorted(r["ttft"] for r in ok)
    latency = [r["seconds"] for r in ok]
    extra = {}
    if long is not None:
        read = long.result()
        window = (read["begin"], read["end"])
        extra = {"long_prompt": {k: read[k] for k in ("tokens", "status")} | {"seconds": round(window[1] - window[0], 2)},
                 "gaps_while_long_prompt": len(gaps(ok, window)),
                 "gap_p90_while_long_prompt_s": quantile(gaps(ok, window), 0.9),
                 "gap_p90_otherwise_s": quantile(gaps(ok, window, inside=False), 0.9)}  # fmt: skip
    return {
        "mode": mode,
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": [r["error"] for r in results if "error" in r][:3],
        "mismatched_vs_alone": mismatched,
        "tokens": sum(r["tokens"] for r in ok),
        "seconds": round(wall, 2),
        "tokens_per_second": round(sum(r["tokens"] for r in ok) / max(wall, 1e-9), 2),
        "ttft_median_s": round(statistics.median(ttft), 4) if ttft else None,
        "ttft_p90_s": quantile(ttft, 0.9),
        "latency_median_s": round(statistics.median(latency), 4) if latency else None,
        "latency_p90_s": quantile(latency, 0.9),
        "gap_p90_s": quantile(gaps(ok), 0.9),
        **extra,
    }


async def alone(url: str, jobs: list[tuple[str, dict]], mode: str, max_tokens: int) -> list[str]:
    """Every request's reply sent alone, one at a time (the reference of the load runs)."""
    async with httpx.AsyncClient() as client:
        out = []
        for job in jobs:
            reply = await _one(client, url, job, mode, max_tokens)
            if "error" in reply:
                raise RuntimeError(f"the reference request failed: {reply['error']}")
            out.append(reply["text"])
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twotower.serve.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated (default: 1,8,32)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per run (default: 60)")
    parser.add_argument("--modes", default="ar,verify", help="modes, comma-separated (default: ar,verify)")
    parser.add_argument("--prompts", type=int, default=16, help="built-in evaluation prompts to cycle over (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default: 64)")
    parser.add_argument("--mixed", action="store_true", help="prompt i with sampling setting i mod 4: greedy; "
                        "temperature 0.7, top_p 0.9; temperature 1, top_k 40; greedy with top_p 0.5 (sampled ones "
                        "seeded with i)")  # fmt: skip
    parser.add_argument("--ignore-eos", action="store_true", help="every reply is --max-tokens long (the request "
                        "field ignore_eos): runs whose settings change where replies end compare like for like")  # fmt: skip
    parser.add_argument("--long-prompt", type=int, default=0, metavar="N", help="one more request, 2 s into each run, "
                        "with a prompt of N tokens: the streams' chunk gaps while it is read are reported apart")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    from twotower.eval.tasks import builtin_tasks, interleave_categories

    prompts = [t.prompt for t in interleave_categories(builtin_tasks())[: args.prompts]]
    jobs = requests(prompts, args.mixed, args.ignore_eos)
    rows = []
    for mode in args.modes.split(","):
        reference = asyncio.run(alone(args.url, jobs, mode, args.max_tokens))
        for n in [int(c) for c in args.clients.split(",")]:
            row = asyncio.run(load(args.url, jobs, mode, n, args.seconds, args.max_tokens, reference, args.long_prompt))
            rows.append(row | {"mixed": args.mixed, "ignore_eos": args.ignore_eos})
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"url": args.url, "runs": rows, "prompts": len(prompts), "max_tokens": args.max_tokens,
                       "mixed": args.mixed, "ignore_eos": args.ignore_eos}, f, indent=2)  # fmt: skip
    return 0 if all(r["errors"] == 0 and r["mismatched_vs_alone"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
