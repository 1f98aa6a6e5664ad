"""Quality of every operating point on a task suite, with AR greedy as the reference: accuracy
per category, agreement with AR, judge perplexity and distinct-2 on long-form, quality
retention (`twotower eval`)."""

from __future__ import annotations

from dataclasses import asdict

from tqdm.auto import tqdm

from twotower.config import TwoTowerError
from twotower.eval import metrics
from twotower.eval.checks import score
from twotower.eval.points import AR, OperatingPoint, generate_replies
from twotower.eval.tasks import Task
from twotower.generate.draft import DraftMemory


def run_eval(
    model,
    tokenizer,
    tasks: list[Task],
    points: list[OperatingPoint],
    judge=None,
    batch_size: int = 8,
    eos: list[int] | None = None,
    encode=None,
    progress: bool = True,
    reference_model=None,
) -> dict:
    """Accuracy per category, agreement with AR, judge perplexity and distinct-2 on long-form,
    quality retention, for every operating point. points[0] must be AR greedy.
    reference_model: another model (the dense weights of a quantised `model`) whose AR greedy
    replies are the reference instead, as a first row "ar dense": every row's retention and
    agreement are then against it, the quantised AR's included."""
    if points[0] != AR:
        raise TwoTowerError("the first operating point must be AR greedy (the reference)")
    prompts = [encode(t.prompt) for t in tasks]
    max_new = [t.max_new_tokens for t in tasks]
    categories = [t.category for t in tasks]
    long_form = [i for i, t in enumerate(tasks) if t.check == "none"]
    rows, reference = [], None
    runs = [(model, point, point.label) for point in points]
    if reference_model is not None:
        runs.insert(0, (reference_model, AR, "ar dense"))
    bar = tqdm(total=len(runs) * len(tasks), desc="eval", unit="prompt", disable=not progress)
    memory = DraftMemory()  # verify's: a later prompt starts from what the earlier ones measured
    for runner, point, label in runs:
        bar.set_postfix_str(label)
        replies, totals = generate_replies(runner, tokenizer, prompts, max_new, point, batch_size, eos or [], bar, memory)
        passed = [score(task, reply.text) for task, reply in zip(tasks, replies)]
        if reference is None:
            reference = replies
        row = {
            "point": label,
            **asdict(point),
            "accuracy": metrics.accuracy_by_category(categories, passed),
            **metrics.agreement([r.tokens for r in replies], [r.tokens for r in reference]),
            "tokens_per_nfe": totals["new_tokens"] / max(totals["nfe"], 1),
            "tokens_per_second": totals["new_tokens"] / max(totals["seconds"], 1e-9),
            "new_tokens": totals["new_tokens"],
            "passed": {t.id: p for t, p in zip(tasks, passed) if p is not None},
        }
        checked = [p for p in passed if p is not None]
        row["overall_accuracy"] = sum(checked) / len(checked) if checked else None
        if long_form:
            row["distinct2"] = sum(metrics.distinct_n(replies[i].text) for i in long_form) / len(long_form)
            if judge is not None:
                nll = [judge.nll_per_token(tasks[i].prompt, replies[i].text) for i in long_form]
                row["judge_ppl"] = metrics.mean_perplexity(nll)
        row["replies"] = {t.id: r.text for t, r in zip(tasks, replies)}
        rows.append(row)
    bar.close()
    ar_row = rows[0]
    for row in rows:
        row["retention"] = metrics.quality_retention(row["accuracy"], ar_row["accuracy"])
        if row.get("judge_ppl") and ar_row.get("judge_ppl"):
            row["judge_ppl_ratio"] = row["judge_ppl"] / ar_row["judge_ppl"]
    return {
        "tasks": len(tasks),
        "categories": sorted(set(categories)),
        "judge": getattr(judge, "name", None),
        "batch_size": batch_size,
        "points": rows,
    }
