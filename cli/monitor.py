"""`tunery status` and `tunery logs`: a job's progress in the terminal, read from the API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    return (
        f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else f"{value // 60}m{value % 60:02d}s"
    )


def status_table(client: httpx.Client, limit: int) -> Table:
    jobs = client.get("/v1/fine_tuning/jobs", params={"limit": limit}).raise_for_status().json()["data"]
    table = Table("job", "model", "stage", "progress", "loss", "tokens/s", "ETA", "cost (USD)")
    now = time.time()
    for job in jobs:
        progress = job["progress"]
        total = progress.get("total_steps") or 0
        done = f"{progress['step']}/{total}" if total else "-"
        eta = job["estimated_finish"] - now if job.get("estimated_finish") else None
        loss = progress.get("train_loss")
        speed = progress.get("tokens_per_second")
        table.add_row(
            job["id"], job["model"], job["stage"], done,
            f"{loss:.4f}" if loss is not None else "-",
            f"{speed:,.0f}" if speed else "-",
            _seconds(eta), f"{job['usage']['cost_usd']:.4f}",
        )  # fmt: skip
    return table


def _sse(client: httpx.Client, job_id: str) -> Iterator[tuple[str | None, dict]]:
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}) as stream:
        stream.raise_for_status()
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield name, json.loads(line.removeprefix("data: "))
                name = None


def follow(client: httpx.Client, job_id: str) -> str:
    """Print the job's events as they happen, with a progress bar; returns its final status."""
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s  ${task.fields[cost]}"),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, loss="-", speed="-", cost="0")
        for name, data in _sse(client, job_id):
            if name == "end":
                return data["status"]
            when = time.strftime("%H:%M:%S", time.localtime(data["created_at"]))
            if data.get("type") == "metrics":
                metrics = data["data"]
                cost = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["usage"]["cost_usd"]
                bar.update(
                    task, completed=metrics["step"], total=metrics["total_steps"],
                    loss=f"{metrics['train_loss']:.4f}", speed=f"{metrics['tokens_per_second']:,.0f}",
                    cost=f"{cost:.4f}",
                )  # fmt: skip
            else:
                style = {"warn": "yellow", "error": "red"}.get(data["level"], "")
                bar.console.print(
                    f"[dim]{when}[/] [{style}]{data['message']}[/]"
                    if style
                    else f"[dim]{when}[/] {data['message']}"
                )
    return "unknown"


def print_events(client: httpx.Client, job_id: str) -> None:
    """The job's latest 1,000 events, oldest first."""
    page = (
        client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).raise_for_status().json()
    )
    for event in reversed(page["data"]):
        when = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
        console.print(f"[dim]{when}[/] {event['message']}")
