"""``automat loadtest --sweep 7,20,40,60``: rate mode at rising offered loads, one report each,
and where the pipeline stops meeting its latency target - the capacity at the target
(*Kapazität bei Ziel-p99*).

Every point is a whole rate-mode run (``run_loadtest``: its own pipeline, mails, ledger and
report under ``<out>/rate-<R>/``) of ``--sweep-seconds`` of offered load, so the points
compare like single runs do. A point is **saturated** when the pipeline no longer keeps
up: it finished fewer mails per second than were offered (below :data:`KEEP_UP`) - its
latency then only says how long the run was; the sweep stops there (higher rates are
saturated too) unless ``--sweep-all``. The **knee** is the highest offered rate that kept
up with p99 within the target and nothing lost or doubled.

Writes ``sweep.json`` (stable keys), ``sweep.md`` and ``sweep.png`` (latency percentiles
and finished mails/s over the offered rate) under the sweep's folder and ends with
``sweep knee_mails_per_s=X  p99_target_ms=Y  points=N  lost=0  duplicates=0``."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

KEEP_UP = 0.95
"""A point keeps up when it finished at least this share of the offered mails per second
(the run's mails over the time from the first delivery to the last terminal slip; a run
that keeps up takes the offered time plus one mail's latency)."""


def parse_rates(text: str) -> list[float]:
    """``"7,20,40"`` -> ``[7.0, 20.0, 40.0]``: positive, rising, at least one."""
    try:
        rates = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--sweep wants offered rates in mails/s separated by commas, e.g. 7,20,40 (got {text!r})")
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ValueError(f"--sweep wants positive rates in mails/s, e.g. 7,20,40 (got {text!r})")
    if any(b <= a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"--sweep wants rising rates, e.g. 7,20,40 (got {text!r})")
    return rates


def mails_for(rate: float, seconds: float) -> int:
    return max(1, math.ceil(rate * seconds))


def point_of(rate: float, r: dict, report_dir: Path | None = None) -> dict:
    """One sweep point from a rate-mode run's report."""
    t, lat, led, res = r["throughput"], r["latency_ms"], r["ledger"], r["resources"]
    achieved = t.get("mails_per_s")
    n = max(1, r["mails"])
    roles = res.get("shard_hosts_by_role") or {}
    by_proc = res.get("cpu_s_by_process") or {}

    def ms_per_mail(*names: str) -> float:
        return round(sum(by_proc.get(x, 0.0) for x in names) / n * 1000, 2)

    return {
        "offered_mails_per_s": rate,
        "mails": r["mails"],
        "finished_mails_per_s": achieved,
        "kept_up": achieved is not None and achieved >= KEEP_UP * rate,
        "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"), "max_ms": lat.get("max"),
        "pickup_p99_ms": lat.get("pickup_p99"),
        "cpu_s_per_mail": res.get("cpu_s_per_mail"),
        # CPU ms per mail where it goes: the shard hosts by role, the mailbox actors (pick-up:
        # NOOP polls, fetch, claim check), Dovecot (the feed's APPENDs and the pick-up's
        # commands, TLS in imap-login) - the feed runs on the same cores as the pipeline
        "slip_ms_per_mail": (roles.get("kim.slip") or {}).get("cpu_ms_per_mail"),
        "worker_ms_per_mail": (roles.get("kim.worker") or {}).get("cpu_ms_per_mail"),
        "mailbox_actors_ms_per_mail": ms_per_mail("ray::MailboxFet"),
        "dovecot_ms_per_mail": ms_per_mail("imap", "imap-login"),
        "lost": led["lost"], "duplicates": led["duplicates"], "balanced": led["balanced"],
        "run_id": r.get("run_id"),
        "report": str(report_dir) if report_dir else None,
    }


def summarize(points: list[dict], p99_target_ms: float) -> dict:
    """The knee: the highest offered rate that kept up, met the p99 target and lost and
    doubled nothing (None if no point did)."""
    ok = [p for p in points if p["kept_up"] and p["p99_ms"] is not None and p["p99_ms"] <= p99_target_ms
          and not p["lost"] and not p["duplicates"] and p["balanced"]]
    knee = max(ok, key=lambda p: p["offered_mails_per_s"], default=None)
    return {
        "p99_target_ms": p99_target_ms,
        "knee_mails_per_s": knee["offered_mails_per_s"] if knee else None,
        "knee_p99_ms": knee["p99_ms"] if knee else None,
        "first_saturated_mails_per_s": next((p["offered_mails_per_s"] for p in points if not p["kept_up"]), None),
        "lost": sum(p["lost"] for p in points),
        "duplicates": sum(p["duplicates"] for p in points),
        "balanced": all(p["balanced"] for p in points),
    }


def summary_line(s: dict, points: list[dict]) -> str:
    knee = s["knee_mails_per_s"]
    return (f"sweep knee_mails_per_s={format(knee, 'g') if knee is not None else 'none'}  "
            f"p99_target_ms={s['p99_target_ms']:g}  "
            f"points={len(points)}  lost={s['lost']}  duplicates={s['duplicates']}")


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def markdown(sweep: dict) -> str:
    s, pts = sweep["summary"], sweep["points"]
    knee = s["knee_mails_per_s"]
    lines = [
        f"# automat loadtest sweep {sweep['sweep_id']}",
        "",
        f"Rate mode at {len(pts)} offered loads, {sweep['seconds_per_point']:g} s of offered load each "
        f"({sweep['mailboxes']} mailboxes, seed {sweep['seed']}); p99 target {s['p99_target_ms']:g} ms.",
        f"Machine: {sweep['machine']}.",
        "",
        ("**Knee: {:g} mails/s** offered kept up with p99 {} ms (<= {:g} ms)".format(knee, _ms(s["knee_p99_ms"]),
                                                                                s["p99_target_ms"])
         if knee is not None else f"**No point** met the p99 target of {s['p99_target_ms']:g} ms")
        + (f"; saturated from {s['first_saturated_mails_per_s']:g} mails/s offered (finished fewer than "
           f"{KEEP_UP:.0%} of the offered mails per second)." if s["first_saturated_mails_per_s"] is not None else "."),
    ]
    lines += [
        "",
        "| offered mails/s | mails | finished mails/s | kept up | p50 ms | p95 ms | p99 ms | max ms | pick-up p99 ms "
        "| CPU s/mail | lost | dup | report |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pts:
        lines.append(
            f"| {p['offered_mails_per_s']:g} | {p['mails']} | {p['finished_mails_per_s']} | "
            f"{'yes' if p['kept_up'] else 'no'} | {_ms(p['p50_ms'])} | {_ms(p['p95_ms'])} | {_ms(p['p99_ms'])} | "
            f"{_ms(p['max_ms'])} | {_ms(p['pickup_p99_ms'])} | {p['cpu_s_per_mail']} | {p['lost']} | "
            f"{p['duplicates']} | {Path(p['report']).name if p['report'] else ''} |")
    lines += [
        "",
        "CPU ms per mail by part (all processes of a point over its mails; at low rates the fixed cost of an idle "
        "stack dominates):",
        "",
        "| offered mails/s | all | slip hosts | worker hosts | mailbox actors | Dovecot |",
        "|---|---|---|---|---|---|",
    ]
    for p in pts:
        cpu = p["cpu_s_per_mail"]
        lines.append(f"| {p['offered_mails_per_s']:g} | {_ms(cpu * 1000 if cpu is not None else None)} | "
                     f"{_ms(p['slip_ms_per_mail'])} | {_ms(p['worker_ms_per_mail'])} | "
                     f"{_ms(p['mailbox_actors_ms_per_mail'])} | {_ms(p['dovecot_ms_per_mail'])} |")
    for n in sweep.get("notes", []):
        lines += ["", f"- {n}"]
    lines += ["", summary_line(s, pts), ""]
    return "\n".join(lines)


def chart(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sweep["points"]
    x = [p["offered_mails_per_s"] for p in pts]
    fig, axes = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for key in ("p50", "p95", "p99"):
        axes[0].plot(x, [p[f"{key}_ms"] for p in pts], marker="o", label=f"{key} end to end")
    axes[0].axhline(sweep["summary"]["p99_target_ms"], color="tab:red", linestyle="--", label="p99 target")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("latency ms")
    axes[0].legend(loc="upper left")
    axes[0].set_title(f"automat loadtest sweep {sweep['sweep_id']}")
    axes[1].plot(x, [p["finished_mails_per_s"] for p in pts], marker="o", label="finished mails/s")
    axes[1].plot(x, x, color="grey", linestyle=":", label="offered = finished")
    axes[1].set_xlabel("offered mails/s")
    axes[1].set_ylabel("mails/s")
    axes[1].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(sweep: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "markdown": out / "sweep.md", "chart": out / "sweep.png"}
    paths["json"].write_text(json.dumps(sweep, indent=1, default=str))
    paths["markdown"].write_text(markdown(sweep))
    chart(sweep, paths["chart"])
    return paths


def _rate_dir(rate: float) -> str:
    return f"rate-{rate:g}".replace(".", "_")


async def run_sweep(cfg, opt, rates: list[float], seconds: float, p99_target_ms: float, console, *,
                    all_points: bool = False) -> dict:
    """Run the points one after another (each a whole ``run_loadtest``); stop after the first
    saturated point unless ``all_points``."""
    import os

    from deploy.loadtest.driver import run_loadtest

    if seconds <= 0:
        raise ValueError("--sweep-seconds must be > 0")
    sweep_id = time.strftime("%Y%m%d-%H%M%S")
    out = Path(opt.out) if opt.out else Path(cfg.run_dir) / "loadtest" / f"sweep-{sweep_id}"
    seed = opt.seed if opt.seed is not None else int.from_bytes(os.urandom(3), "big")
    points: list[dict] = []
    notes: list[str] = []
    for i, rate in enumerate(rates):
        n = mails_for(rate, seconds)
        console.rule(f"sweep point {i + 1}/{len(rates)}: {rate:g} mails/s offered, {n} mails")
        pdir = out / _rate_dir(rate)
        try:
            r = await run_loadtest(cfg, replace(opt, rate=rate, mails=n, out=pdir, seed=seed + i, baselines=False),
                                   console)
        except Exception as e:  # the points run so far keep their sweep report
            notes.append(f"point {rate:g} mails/s failed: {type(e).__name__}: {e}; not run: "
                         + (", ".join(f"{x:g}" for x in rates[i + 1:]) or "-"))
            _finish(out, sweep_id, seconds, opt, seed, rates, points, notes, p99_target_ms, console)
            raise
        points.append(point_of(rate, r, pdir))
        if not points[-1]["kept_up"] and not all_points and i + 1 < len(rates):
            skipped = ", ".join(f"{x:g}" for x in rates[i + 1:])
            notes.append(f"stopped after {rate:g} mails/s: saturated (finished {points[-1]['finished_mails_per_s']} "
                         f"mails/s); not run: {skipped} (`--sweep-all` runs them)")
            break
    return _finish(out, sweep_id, seconds, opt, seed, rates, points, notes, p99_target_ms, console)


def _finish(out: Path, sweep_id: str, seconds: float, opt, seed: int, rates: list[float], points: list[dict],
            notes: list[str], p99_target_ms: float, console) -> dict:
    import os

    from deploy.loadtest.driver import _mem_gib

    s = summarize(points, p99_target_ms)
    sweep = {
        "sweep_id": sweep_id, "seconds_per_point": seconds, "mailboxes": opt.mailboxes, "seed": seed,
        "machine": f"{os.cpu_count()} cores, {_mem_gib():.1f} GiB", "rates": rates,
        "points": points, "summary": s, "notes": notes,
    }
    paths = write(sweep, out)
    console.print(f"sweep report: {paths['markdown']}  {paths['json']}  {paths['chart']}")
    console.print(summary_line(s, points))
    return sweep
