"""The load test report: JSON (stable keys), Markdown summary, PNG chart."""

from __future__ import annotations

import json
from pathlib import Path


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_breakdown(delivered_at: float, slip: dict, t0: float) -> dict:
    """Where one mail's end-to-end time went, from its slip (``history``: per step the
    wall time ``started -> ended`` on the slip and the worker's own ``worker_ms``):

    * ``pickup_ms`` - delivered into IMAP -> slip created (mailbox actor: poll/IDLE, fetch);
    * ``work_ms`` - the step code itself (sum of ``worker_ms``);
    * ``wait_ms`` - the rest of slip created -> terminal: Ray hops, queueing behind other
      mails, durable commits;
    * the step with the longest wall time (its wall and worker ms)."""
    created = slip.get("created_at") or delivered_at
    finished = slip.get("finished_at") or slip.get("updated_at") or created
    hist = slip.get("history") or []
    work = sum(h.get("worker_ms") or 0.0 for h in hist)
    walls = [((h.get("ended") or h["started"]) - h["started"], h) for h in hist if h.get("started")]
    worst_wall, worst = max(walls, key=lambda x: x[0], default=(0.0, {}))
    return {
        "at_s": round(delivered_at - t0, 2),
        "latency_ms": round((finished - delivered_at) * 1000.0, 1),
        "pickup_ms": round((created - delivered_at) * 1000.0, 1),
        "work_ms": round(work, 1),
        "wait_ms": round((finished - created) * 1000.0 - work, 1),
        "steps": len(hist),
        "slowest_step": worst.get("step"),
        "slowest_step_wall_ms": round(worst_wall * 1000.0, 1),
        "slowest_step_worker_ms": round(worst.get("worker_ms") or 0.0, 1),
    }


def summary_line(r: dict) -> str:
    p99 = r["latency_ms"]["p99"]
    return (f"mails={r['mails']}  mails_per_s={r['throughput']['mails_per_s']}  "
            f"p99_ms={round(p99) if p99 is not None else 'n/a'}  lost={r['ledger']['lost']}  "
            f"duplicates={r['ledger']['duplicates']}")


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.3g}"
    return f"{v}{unit}"


def markdown(r: dict) -> str:
    t, lat, led, res = r["throughput"], r["latency_ms"], r["ledger"], r["resources"]
    lines = [
        f"# automat loadtest {r['run_id']}",
        "",
        f"{r['mode']} mode, {r['mails']} mails ({r['mix_text']}; faulty share {r['fault_rate']:.0%}) over "
        f"{r['mailboxes']} mailboxes; pipeline: {r['pipeline']['slip_hosts']} slip hosts, "
        f"{r['pipeline']['worker_hosts']} worker hosts, {r['pipeline']['fetchers']} mailbox actors, "
        f"fuse_max={r['pipeline']['fuse_max']}, max_in_flight={r['pipeline'].get('max_in_flight')}"
        + (f", pickup_poll_ms={r['pipeline']['pickup_poll_ms']:g}" if r['pipeline'].get('pickup_poll_ms') else "") + ".",
        f"Machine: {r['machine']['cores']} cores, {r['machine']['memory_gib']} GiB, load average at start "
        f"{r['machine']['loadavg_start']}, at end {r['machine']['loadavg_end']}.",
        "",
        "## Throughput and latency",
        "",
        "| measure | value |",
        "|---|---|",
        f"| generator | {_fmt(r['generator'].get('mails_per_s'))} mails/s ({r['generator'].get('mode')}) |",
        f"| time for all mails | {_fmt(t['seconds'])} s |",
        f"| mails/s (overall) | {_fmt(t['mails_per_s'])} |",
        f"| mails/s sustained (median of 10 s windows after warm-up) | {_fmt(t['sustained_mails_per_s'])} |",
        f"| latency p50 / p95 / p99 / max (delivered -> terminal) | {_fmt(lat['p50'])} / {_fmt(lat['p95'])} / "
        f"{_fmt(lat['p99'])} / {_fmt(lat['max'])} ms |",
        f"| latency of done eAU mails p50 / p99 (delivered -> deposited and released) | "
        f"{_fmt(lat.get('eau_done_p50'))} / {_fmt(lat.get('eau_done_p99'))} ms |",
        f"| of it: delivered -> slip created (IMAP pick-up) p50 / p99 | {_fmt(lat.get('pickup_p50'))} / "
        f"{_fmt(lat.get('pickup_p99'))} ms |",
        f"| CPU per mail (all processes of the run) | {_fmt(res['cpu_s_per_mail'])} s |",
        f"| peak RSS (all processes of the run) | {_fmt(res['peak_rss_mib'])} MiB |",
        f"| RSS at 25 % / 50 % / 90 % of the run | {' / '.join(_fmt(x) for x in res['rss_mib_at'])} MiB |",
        f"| without the stack's services (driver + Ray cluster): CPU per mail, RSS at 25/50/90 % | "
        f"{_fmt(res.get('pipeline_cpu_s_per_mail'))} s, "
        f"{' / '.join(_fmt(x) for x in res.get('pipeline_rss_mib_at', []))} MiB |",
        f"| Redis commands per mail | {_fmt(res['redis_ops_per_mail'])} |",
    ]
    cal = r["machine"].get("calibration")
    if cal and t.get("kernel_cores") is not None:
        s0, s1 = cal["start"]["ms_per_mail"], cal["end"]["ms_per_mail"]
        cores = r["machine"]["cores"]
        lines.append(f"| calibration: the steps' compute kernel (MIME, CMS, chain, FHIR XML) on one core, "
                     f"start / end of the run | {s0:.3f} / {s1:.3f} ms per mail |")
        lines.append(f"| throughput in units of the machine's speed (mails/s x kernel ms: cores' worth of the kernel "
                     f"per second; runs of different hours compare by it) | {t['kernel_cores']:.3f} of {cores} "
                     f"(the kernel alone: {cores * 2000 / (s0 + s1):,.0f} mails/s) |")
    lines += [
        "",
        "CPU seconds by process during the pipeline run: " + ", ".join(
            f"{k} {v}" for k, v in list(res.get("cpu_s_by_process", {}).items())[:12]) + ".",
        "",
    ]
    roles = res.get("shard_hosts_by_role") or {}
    if roles:
        lines += ["Shard hosts by role (`ray::ShardHost` above; from the clock's start): " + ", ".join(
            f"{k} ({v['hosts']} host{'s' if v['hosts'] != 1 else ''}) {v['cpu_s']:.1f} s = "
            + (f"{v['cpu_ms_per_mail']:.2f} ms per mail" if v.get("cpu_ms_per_mail") is not None else "n/a per mail")
            + (f" (garbage collector {v['gc_s']:.1f} s, {v['gc_full_passes']} full passes, longest pause "
               f"{v['gc_max_pause_ms']:.0f} ms)" if v.get("gc_s") is not None else "")
            for k, v in roles.items()) + ".", ""]
    lines += [
        "RSS by process at 25 / 50 / 90 % of the run (MiB, summed over processes of a name; most growth first): "
        + "; ".join(f"{k} {' / '.join(_fmt(x) for x in v)}" for k, v in res.get("rss_mib_by_process_at", {}).items())
        + ".",
        "",
        "## Ledger",
        "",
        f"delivered {led['delivered']} = done {led['done']} (of which work basket {led['workbasket']}) + rejected "
        f"{led['rejected']} + parked {led['parked']} + in flight {led['in_flight']}; not received {led['missing']}; "
        f"balanced: {'yes' if led['balanced'] else 'NO'}. Core-system records {led['core_records']} for "
        f"{led['core_mails']} distinct mails; lost {led['lost']}, duplicates {led['duplicates']}; "
        f"outcome as the spec prescribes: {led['as_expected']} of {led['delivered']}.",
        "",
    ]
    if led.get("by_error"):
        lines += ["Rejected/parked by error code: " + ", ".join(f"{k} {v}" for k, v in sorted(led["by_error"].items())), ""]
    if r.get("baselines"):
        lines += ["## Baselines (same mails, same step code)", "", "| run | mails | mails/s | CPU s/mail | automat / it |",
                  "|---|---|---|---|---|"]
        for b in r["baselines"]:
            lines.append(f"| {b['name']} | {b['mails']} | {_fmt(b['mails_per_s'])} | {_fmt(b.get('cpu_s_per_mail'))} | "
                         f"{_fmt(b.get('ratio'))}x |")
        lines.append("")
    if r.get("autoscaler"):
        lines += ["## Autoscaler decisions (t: seconds since the run's clock started)", "",
                  "| t | pool | action | hosts | reason |", "|---|---|---|---|---|"]
        for e in r["autoscaler"][:60]:
            hosts = (f"{e['hosts_before']} -> {e['hosts_after']}" if "hosts_after" in e else "")
            lines.append(f"| {e['t']} | {e.get('kind', '')} | {e.get('action', '')} | {hosts} | {e.get('reason', '')} |")
        lines.append("")
    if r.get("steps"):
        lines += ["## Steps (p50 / p99 ms, from the slips' histories)", "", "| step | runs | p50 | p99 |", "|---|---|---|---|"]
        for s in r["steps"][:45]:
            lines.append(f"| {s['step']} | {s['runs']} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} |")
        lines.append("")
    if r.get("slowest"):
        lines += ["## The slowest mails (where their time went)", "",
                  "at: delivered, seconds after the clock started; pick-up: delivered -> slip created; work: the "
                  "step code; wait: Ray hops, queueing and commits between the steps.", "",
                  "| at s | latency ms | pick-up ms | work ms | wait ms | steps | longest step (wall / worker ms) |",
                  "|---|---|---|---|---|---|---|"]
        for m in r["slowest"]:
            lines.append(f"| {_fmt(m['at_s'])} | {_fmt(m['latency_ms'])} | {_fmt(m['pickup_ms'])} | "
                         f"{_fmt(m['work_ms'])} | {_fmt(m['wait_ms'])} | {m['steps']} | {m['slowest_step']} "
                         f"({_fmt(m['slowest_step_wall_ms'])} / {_fmt(m['slowest_step_worker_ms'])}) |")
        lines.append("")
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += ["Chart: `chart.png`; raw numbers: `report.json`.", "", summary_line(r), ""]
    return "\n".join(lines)


def chart(r: dict, series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    t = series.get("t", [])
    axes[0].plot(t, series.get("done_per_s", []), label="mails terminal / s (10 s window)")
    if series.get("offered_per_s"):
        axes[0].plot(t, series["offered_per_s"], label="mails delivered / s", alpha=0.6)
    axes[0].set_ylabel("mails / s")
    axes[0].legend(loc="upper right")
    axes[0].set_title(f"automat loadtest {r['run_id']}: {r['mails']} mails, {r['mode']} mode")
    for key in ("p50", "p95", "p99"):
        axes[1].plot(t, series.get(f"lat_{key}", []), label=f"{key} end to end")
    axes[1].set_ylabel("latency ms (mails finished in the window)")
    axes[1].set_yscale("log")
    axes[1].legend(loc="upper left")
    axes[2].plot(series.get("res_t", []), series.get("rss_mib", []), label="RSS all processes (MiB)")
    ax2 = axes[2].twinx()
    ax2.plot(series.get("res_t", []), series.get("cpu_pct", []), color="tab:red", alpha=0.5, label="CPU % (200 = 2 cores)")
    axes[2].set_ylabel("MiB")
    ax2.set_ylabel("CPU %")
    axes[2].set_xlabel("seconds since the pipeline started")
    axes[2].legend(loc="upper left")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(r: dict, series: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "chart": out / "chart.png"}
    paths["json"].write_text(json.dumps({**r, "series": series}, indent=1, default=str))
    paths["markdown"].write_text(markdown(r))
    chart(r, series, paths["chart"])
    return paths
