"""The benchmark's report: each library's best mode, the ratios, and the printed table."""

from __future__ import annotations


def _best(rows: list[dict], key: str, lower_is_better: bool) -> dict | None:
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return None
    return (min if lower_is_better else max)(rows, key=lambda r: r[key])


def ratios(rows: list[dict], peak_tflops: float | None = None) -> list[dict]:
    """Per (config, what): tinyldm's best against diffusers' best, as a speed-up (> 1: tinyldm is
    faster), and, given the chip's bf16 matmul peak, the fraction of it each side's best train step
    achieved."""
    out = []
    for key in sorted({(r["config"], r["what"]) for r in rows}):
        group = [r for r in rows if (r["config"], r["what"]) == key]
        timed = key[1] in ("sample", "sample_cfg")
        metric = "seconds" if timed else "img_per_s"
        best = {lib: _best([r for r in group if r["library"] == lib], metric, timed)
                for lib in ("tinyldm", "diffusers")}
        row = {"config": key[0], "what": key[1], "metric": metric,
               **{f"{lib}_best_mode": b["mode"] for lib, b in best.items() if b},
               **{f"{lib}_best": b[metric] for lib, b in best.items() if b}}
        if best["tinyldm"] and best["diffusers"]:
            t, d = best["tinyldm"][metric], best["diffusers"][metric]
            row["speedup"] = d / t if timed else t / d
            if "params" in best["tinyldm"]:
                row["params_ratio"] = best["tinyldm"]["params"] / best["diffusers"]["params"]
            pt, pd = best["tinyldm"].get("peak_mib"), best["diffusers"].get("peak_mib")
            row["peak_memory_ratio"] = pt / pd if pt and pd else None
            saved = {lib: next((r["saved_mib"] for r in group
                                if r["library"] == lib and "saved_mib" in r), None)
                     for lib in ("tinyldm", "diffusers")}
            if saved["tinyldm"] and saved["diffusers"]:
                row["saved_memory_ratio"] = saved["tinyldm"] / saved["diffusers"]
        if peak_tflops:
            for lib, b in best.items():
                if b and "tflops" in b:
                    row[f"{lib}_fraction_of_peak"] = b["tflops"] / peak_tflops
        out.append(row)
    return out


TABLE_HEADER = (f"{'config':<14}{'what':<11}{'library':<10}{'mode':<16}{'batch':>6}"
                f"{'params (M)':>11}{'img/s':>10}{'seconds':>10}{'TFLOP/s':>9}{'peak MiB':>10}"
                f"{'saved MiB':>10}{'1st call s':>11}")


def format_row(r: dict) -> str:
    head = f"{r['config']:<14}{r['what']:<11}{r['library']:<10}{r['mode']:<16}"
    if "error" in r:
        return f"{head}  FAILED {r['error']}"
    params = f"{r['params'] / 1e6:.2f}" if "params" in r else ""
    img = f"{r['img_per_s']:.1f}" if "img_per_s" in r else ""
    tflops = f"{r['tflops']:.2f}" if "tflops" in r else ""
    peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else ""
    saved = f"{r['saved_mib']:.0f}" if r.get("saved_mib") else ""
    breaks = f"  ({r['graph_breaks']} graph breaks)" if r.get("graph_breaks") else ""
    return (f"{head}{r.get('batch', ''):>6}{params:>11}{img:>10}{r['seconds']:>10.4f}{tflops:>9}"
            f"{peak:>10}{saved:>10}{r['first_call_s']:>11.1f}{breaks}")


def print_summary(summary: list[dict]) -> None:
    if any("speedup" in s for s in summary):
        print("\ntinyldm's best against diffusers' best (speed-up > 1: tinyldm is faster; "
              "sampling: tinyldm's whole DDIM loop against diffusers' UNet evaluations alone)")
        for s in summary:
            if "speedup" in s:
                mem = (f", peak memory x{s['peak_memory_ratio']:.2f}" if s.get("peak_memory_ratio")
                       else "")
                if s.get("saved_memory_ratio"):
                    mem += f", saved for backward x{s['saved_memory_ratio']:.2f}"
                par = f", parameters x{s['params_ratio']:.3f}" if "params_ratio" in s else ""
                if "tinyldm_fraction_of_peak" in s:
                    par += (f", {100 * s['tinyldm_fraction_of_peak']:.0f}% vs "
                            f"{100 * s.get('diffusers_fraction_of_peak', float('nan')):.0f}% of "
                            "the bf16 matmul peak")
                print(f"  {s['config']:<14}{s['what']:<11} x{s['speedup']:.2f}  "
                      f"({s['tinyldm_best_mode']} vs {s['diffusers_best_mode']}{par}{mem})")
