"""A load test for `twotower serve`: N concurrent clients (asyncio + httpx) send greedy chat
requests for a while; aggregate tokens/s, time to first token, errors, and whether every reply
equals the same request's reply sent alone.

    python -m twotower.serve.load http://127.0.0.1:8000 --clients 1,8,32 --seconds 60 --modes ar,verify --out load.json

Each client streams its requests (so time to first token is the client's own), cycling over
the built-in evaluation prompts; a reference pass first sends every prompt alone, one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def _one(client: httpx.AsyncClient, url: str, prompt: str, mode: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "mode": mode,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    begin, first, text, tokens = time.perf_counter(), None, [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
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
                    text.append(piece)
    end = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "ttft": (first or end) - begin, "seconds": end - begin}


async def load(url: str, prompts: list[str], mode: str, clients: int, seconds: float, max_tokens: int,
               reference: dict[str, str] | None = None) -> dict:  # fmt: skip
    """`clients` concurrent clients for `seconds`; each client sends the prompts in turn."""
    results, stop_at = [], time.perf_counter() + seconds
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(k: int):
            i = k
            while time.perf_counter() < stop_at:
                prompt = prompts[i % len(prompts)]
                out = await _one(client, url, prompt, mode, max_tokens)
                out["prompt"] = prompt
                results.append(out)
                i += clients

        begin = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - begin
    ok = [r for r in results if "error" not in r]
    mismatched = sum(1 for r in ok if reference is not None and reference.get(r["prompt"]) != r["text"])
    ttft = sorted(r["ttft"] for r in ok)
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
        "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 4) if ttft else None,
    }


async def alone(url: str, prompts: list[str], mode: str, max_tokens: int) -> dict[str, str]:
    """Every prompt's reply sent alone, one request at a time (the reference of the load runs)."""
    async with httpx.AsyncClient() as client:
        out = {}
        for p in prompts:
            reply = await _one(client, url, p, mode, max_tokens)
            if "error" in reply:
                raise RuntimeError(f"the reference request failed: {reply['error']}")
            out[p] = reply["text"]
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twotower.serve.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated (default: 1,8,32)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per run (default: 60)")
    parser.add_argument("--modes", default="ar,verify", help="modes, comma-separated (default: ar,verify)")
    parser.add_argument("--prompts", type=int, default=16, help="built-in evaluation prompts to cycle over (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default: 64)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    from twotower.eval.tasks import builtin_tasks, interleave_categories

    prompts = [t.prompt for t in interleave_categories(builtin_tasks())[: args.prompts]]
    rows = []
    for mode in args.modes.split(","):
        reference = asyncio.run(alone(args.url, prompts, mode, args.max_tokens))
        for n in [int(c) for c in args.clients.split(",")]:
            row = asyncio.run(load(args.url, prompts, mode, n, args.seconds, args.max_tokens, reference))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"url": args.url, "runs": rows, "prompts": len(prompts), "max_tokens": args.max_tokens}, f, indent=2)
    return 0 if all(r["errors"] == 0 and r["mismatched_vs_alone"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
