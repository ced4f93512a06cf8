"""A small load generator for an OpenAI-compatible server (the official `openai` client, asyncio).

    .venv/bin/python scripts/openai_load.py --url http://127.0.0.1:8000/v1 --model mixtral-1024 \
        --concurrency 1 8 32 --prompt-tokens 32 --max-tokens 32 [--requests-per-client 4] [--json out.json]

For each concurrency C: C clients, each sending --requests-per-client streamed greedy completions
one after another (prompts: --prompt-tokens random token ids, so no tokenizer is needed), after
one untimed warm-up request per client. Per concurrency it prints

    TTFT          time to the first streamed chunk (ms: mean, p50, p90)
    TPOT          time per output token after the first: (latency - TTFT) / (tokens - 1), ms
    output tok/s  completion tokens of all requests / wall time of the run

Token counts are the server's (`usage`, via stream_options.include_usage). Bounded: it sends
C x (requests-per-client + 1) requests to --url and stops (loopback only, for this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import openai


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> dict:
    started = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    first = first or done
    return {"ttft_s": first - started, "latency_s": done - started, "tokens": tokens,
            "tpot_s": (done - first) / (tokens - 1) if tokens > 1 else None}


async def run_level(args: argparse.Namespace, concurrency: int) -> dict:
    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    rng = random.Random(concurrency)

    def prompt() -> list[int]:
        return [rng.randrange(args.min_token_id, args.vocab) for _ in range(args.prompt_tokens)]

    async def client_loop(warm: bool) -> list[dict]:
        return [await one_request(client, args.model, prompt(), args.max_tokens)
                for _ in range(1 if warm else args.requests_per_client)]

    await asyncio.gather(*(client_loop(True) for _ in range(concurrency)))  # warm-up, untimed
    started = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client_loop(False) for _ in range(concurrency))) for r in rs]
    wall = time.perf_counter() - started
    await client.close()
    ttft = [r["ttft_s"] * 1e3 for r in results]
    tpot = [r["tpot_s"] * 1e3 for r in results if r["tpot_s"] is not None]
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": sum(r["tokens"] for r in results),
            "wall_s": round(wall, 2), "output_tok_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot)}


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(values), 1), "p50": round(ordered[len(ordered) // 2], 1),
            "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL of the OpenAI API")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default="none", help="bearer token, if the server wants one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn from [min-token-id, vocab)")
    parser.add_argument("--min-token-id", type=int, default=300)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    levels = []
    print(f"{'C':>3} {'requests':>8} {'TTFT ms (mean/p50/p90)':>24} {'TPOT ms (mean/p50/p90)':>24} {'output tok/s':>12}")
    for concurrency in args.concurrency:
        level = asyncio.run(run_level(args, concurrency))
        levels.append(level)
        t, p = level["ttft_ms"], level["tpot_ms"]
        print(f"{concurrency:>3} {level['requests']:>8} {t['mean']:>8.0f}/{t['p50']:>6.0f}/{t['p90']:>7.0f} "
              f"{p.get('mean', 0):>8.1f}/{p.get('p50', 0):>6.1f}/{p.get('p90', 0):>7.1f} {level['output_tok_s']:>12.2f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(levels, out, indent=2)


if __name__ == "__main__":
    main()
