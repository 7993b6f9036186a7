#!/usr/bin/env python3
"""Composes docs/RESULTS.md from the JSON that `qfilters eval` and `qfilters calibrate --tune`
wrote (see scripts/results.sh): per model, the tuning sweep, streaming perplexity with the
share of StreamingLLM's perplexity drop each policy recovers (the Q-Filters paper's metric),
and passkey rates with Wilson 95% intervals."""
import glob, json, math, os, re, sys

d = sys.argv[1] if len(sys.argv) > 1 else "docs/results"

MODELS = [  # (prefix, display name)
    ("qwen05", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M"),
    ("smollm2", "SmolLM2-135M-Instruct Q4_1"),
    ("gemma3", "Gemma-3-270M Q4_K_M"),
]
# The bar: Q-Filters PPL at most this fraction of the better of StreamingLLM and K-norm.
BAR = 0.97


def load(name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else []


def cfg(r):
    if r["policy"] == "none":
        return "full cache"
    if r["policy"] not in ("streaming", "random"):
        g = r["granularity"] + ("" if r["granularity"] == "head" else " " + r["combiner"])
        rec = f' recency{r["recency"]:g}' if r.get("recency") else " recency0"
        mix = f' mix{r["mix_weight"]:g}' if "mix_weight" in r else ""
        return f'w{r["window"]} s{r["sinks"]} {g}{rec}{mix}'
    return f's{r["sinks"]} recent'


def kept_cell(policy, kept):
    """Mean key survival over the trials that measured it; 100% for the full cache."""
    if policy == "none":
        return "100%"
    n = sum(t for _, t in kept)
    return f"{100 * sum(k * t for k, t in kept) / n:.0f}%" if n else ""


def wilson(hits, n, z=1.96):
    """Wilson score interval for a binomial rate (95%)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def recovered(stream, full, x):
    """(PPL_stream - PPL_policy) / (PPL_stream - PPL_full)."""
    gap = stream - full
    return (stream - x) / gap if gap > 0 else float("nan")


def pct(x):
    return "–" if x is None or x != x else f"{100 * x:.0f}%"


TUNE_TIE = 0.01  # src/calibrate/tune.rs


def pick(rows):
    """The tie rule of `calibrate --tune`: the first row, replaced by a later one only when that
    one's objective is lower by more than TUNE_TIE."""
    best = rows[0]
    for r in rows[1:]:
        if r["objective"] < best["objective"] - TUNE_TIE:
            best = r
    return best


def tune_section(tune):
    """The sweep of `calibrate --tune`, one row per setting and budget. Sweeps from before it
    chose the policy carry neither policy nor role: they were qfilters only."""
    t = tune[0]
    o = ["### Tuned defaults (`calibrate --tune`)\n"]
    policies = list(dict.fromkeys(r.get("policy", "qfilters") for r in tune))
    head = (f'first {t["tokens"]} tokens of `{t["text"]}` (development text), chunks of {t["chunk"]}; objective = '
            f'mean of ln PPL all and ln PPL 2nd half; ')
    if policies == ["qfilters"]:
        o.append('Policy qfilters, ' + head + 'every recency with every window, then granularity at the best pair; '
                 'a later setting wins only when its objective is lower by more than 0.01.\n')
        o.append("| recency | window | granularity | budget | PPL | PPL 2nd half | objective | chosen |")
        o.append("|---:|---:|---|---:|---:|---:|---:|---|")
        for r in tune:
            o.append(f'| {r["recency"]:g} | {r["window"]} | {r["granularity"]} | {r["budget"]} | {r["ppl"]:.2f} | '
                     f'{r["ppl_second_half"]:.2f} | {r["objective"]:.4f} | {"**yes**" if r["chosen"] else ""} |')
        o.append("")
        return "\n".join(o)
    first = policies[0]
    o.append(head[0].upper() + head[1:] + f'{first}: every recency with every window, then granularity at the best pair; every other '
             'candidate (the policies whose inputs exist, and the combinations `policy::TUNE_COMBINATIONS` lists; the rows show which were measured) and the references (measured, never '
             f'chosen) at recency 0 and the best recency of {first}, at its window and granularity (by position where a '
             "policy's heads all score alike); each policy's best, then the policy, chosen by one rule: a later "
             'one wins only when its objective is lower by more than 0.01.\n')
    o.append("| policy | role | recency | window | granularity | budget | PPL | PPL 2nd half | objective | chosen |")
    o.append("|---|---|---:|---:|---|---:|---:|---:|---:|---|")
    for r in tune:
        o.append(f'| {r["policy"]} | {r["role"]} | {r["recency"]:g} | {r["window"]} | {r["granularity"]} | '
                 f'{r["budget"]} | {r["ppl"]:.2f} | {r["ppl_second_half"]:.2f} | {r["objective"]:.4f} | '
                 f'{"**yes**" if r["chosen"] else ""} |')
    # One objective per setting (rows repeat it per budget), each policy's best by the tie rule.
    settings = {}
    for r in tune:
        settings.setdefault((r["policy"], r["recency"], r["window"], r["granularity"]), r)
    best = {p: pick([r for k, r in settings.items() if k[0] == p]) for p in policies}
    chosen = next((r for r in tune if r["chosen"]), None)
    if chosen:
        cands = [best[p] for p in policies if best[p]["role"] == "candidate"]
        i = next(j for j, r in enumerate(cands) if r["policy"] == chosen["policy"])
        obj = lambda r: f'{r["policy"]} {r["objective"]:.4f}'
        if i == 0:
            why = "it is listed first"
        else:
            replaced = pick(cands[:i])
            why = f'it is lower by more than 0.01 than {obj(replaced)}, the best before it,'
        if cands[i + 1:]:
            why += f' and no later candidate ({", ".join(map(obj, cands[i + 1:]))}) is lower by more than 0.01'
        refs = [best[p] for p in policies if best[p]["role"] == "reference"]
        vs = " and ".join(f'{"beats" if chosen["objective"] < r["objective"] else "does not beat"} {r["policy"]} '
                          f'({r["objective"]:.4f}, difference {chosen["objective"] - r["objective"]:+.4f})'
                          for r in refs)
        o.append(f'\n**Chosen: {chosen["policy"]}** at recency {chosen["recency"]:g}, window {chosen["window"]}, '
                 f'{chosen["granularity"]} (objective {chosen["objective"]:.4f}), because {why}; it {vs}.')
    o.append("")
    return "\n".join(o)


def frontier_section(prefix, rows):
    """Perplexity against the KV bytes llama.cpp allocated; the Pareto front is eval's (`pareto`)."""
    t = rows[0]
    f16 = next((r["kv_bytes"] for r in rows if r["policy"] == "none" and r["cache_type_k"] == "f16"), None)
    o = ["### Quality per byte: eviction on quantized caches\n",
         f'{t["tokens"]} tokens of `{os.path.basename(t["text"])}` (held out), chunks of {t["chunk"]}; K and V '
         f'caches of the same type (llama.cpp\'s `-ctk`/`-ctv`); KV MiB = the K and V bytes llama.cpp allocated '
         f'(it rounds a context up to 256 cells); **front** = no other row has at most its bytes and at most its '
         f'perplexity ([SVG]({prefix}_frontier_ppl.svg)).\n',
         "| cache | policy | budget | setting | KV MiB | of f16 full | PPL | PPL 2nd half | front |",
         "|---|---|---:|---|---:|---:|---:|---:|:---:|"]
    for r in sorted(rows, key=lambda r: (r["kv_bytes"], r["ppl"])):
        share = f'{100 * r["kv_bytes"] / f16:.0f}%' if f16 else "–"
        o.append(f'| {r["cache_type_k"]} | {r["policy"]} | {r["budget"] or "–"} | {cfg(r)} | '
                 f'{r["kv_bytes"] / 2**20:.2f} | {share} | {r["ppl"]:.2f} | {r["ppl_second_half"]:.2f} | '
                 f'{"**yes**" if r.get("pareto") else ""} |')
    # The issue's two questions, answered from the rows.
    q4 = next((r for r in rows if r["policy"] == "none" and r["cache_type_k"] == "q4_0"), None)
    if q4:
        rivals = [r for r in rows if r["policy"] != "none" and r["cache_type_k"] in ("f16", "q8_0")
                  and r["kv_bytes"] <= q4["kv_bytes"]]
        best = min(rivals, key=lambda r: r["ppl"], default=None)
        if best:
            verdict = "beats" if best["ppl"] < q4["ppl"] else "does not beat"
            o.append(f'\nAt the bytes of the full q4_0 cache ({q4["kv_bytes"] / 2**20:.2f} MiB, PPL {q4["ppl"]:.2f}), '
                     f'the best eviction setting on an f16 or q8_0 cache ({best["policy"]} {best["cache_type_k"]} '
                     f'budget {best["budget"]}, {best["kv_bytes"] / 2**20:.2f} MiB) has PPL {best["ppl"]:.2f}: it '
                     f'{verdict} quantization alone.')
    if f16:
        below = [r for r in rows if r.get("pareto") and r["kv_bytes"] < f16 / 8]
        if below:
            o.append(f'Below 1/8 of the f16 bytes ({f16 / 8 / 2**20:.2f} MiB) the front is: ' + ", ".join(
                f'{r["policy"]} {r["cache_type_k"]} b{r["budget"]} (PPL {r["ppl"]:.2f})' for r in below) + ".")
    o.append("")
    return "\n".join(o)


def passkey_frontier_section(prefix, rows):
    """Passkey rate against the KV bytes llama.cpp allocated; the Pareto front is eval's."""
    t = next((r for r in rows if r.get("ratio")), rows[0])
    f16 = next((r["kv_bytes"] for r in rows if r["policy"] == "none" and r["cache_type_k"] == "f16"), None)
    o = ["### Retrieval per byte: passkey on quantized caches\n",
         f'{t["trials"]} documents of {t["length"]} tokens, key at depth {t["depth"]}, chat prompt, filler '
         f'from tinyshakespeare; eviction at {t["ratio"]:g}x (budget = document tokens / ratio); K and V caches of the '
         f'same type; KV MiB = the K and V bytes llama.cpp allocated; **front** = no other row has at most its bytes '
         f'and at least its rate ([SVG]({prefix}_frontier_passkey.svg)).\n',
         "| cache | policy | budget | setting | KV MiB | of f16 full | passkey | answer NLL | key kept | front |",
         "|---|---|---:|---|---:|---:|---:|---:|---:|:---:|"]
    for r in sorted(rows, key=lambda r: (r["kv_bytes"], -r["accuracy"])):
        share = f'{100 * r["kv_bytes"] / f16:.0f}%' if f16 else "–"
        kept = r.get("key_kept")
        o.append(f'| {r["cache_type_k"]} | {r["policy"]} | {r["budget"] if r["policy"] != "none" else "–"} | '
                 f'{cfg(r)} | {r["kv_bytes"] / 2**20:.2f} | {share} | {round(r["accuracy"] * r["trials"])}/{r["trials"]} | '
                 f'{r["answer_nll"]:.3f} | {"–" if kept is None else f"{100 * kept:.0f}%"} | '
                 f'{"**yes**" if r.get("pareto") else ""} |')
    o.append("")
    return "\n".join(o)


out = []
out.append("# Results\n")
out.append("Generated by `scripts/results.sh` (tables composed by `scripts/results_tables.py` from the JSON in "
           "`docs/results/`). Machines: 2-core x86-64 VMs, 24 GiB, no GPU, each named in the dated sections of "
           "the notes below with the rows it produced; every command with `-t 1`, beside other work, so tok/s are "
           "only comparable within one table, roughly.\n")
tune_tokens = sorted({r["tokens"] for m, _ in MODELS for r in load(f"{m}_tune.json")})
out.append("Per model: Q-Filters calibrated on tinyshakespeare; eviction defaults tuned by "
           f"`qfilters calibrate --tune` on the first {'/'.join(map(str, tune_tokens)) or '?'} tokens of "
           "tinyshakespeare (development text); "
           "perplexity measured on held-out wikitext2-valid; passkey filler from tinyshakespeare. K-norm runs "
           "with the same tuned settings as Q-Filters (the defaults `eval` takes from the filters when no flag "
           "is given); KeyDiff (no filters) runs with the tuned window and granularity, with the tuned recency prior "
           "(the prior's value in its setting) and without it (recency0); Expected Attention (query statistics "
           "from the same calibration pass, stored in the filters) runs with the tuned filters, with and without "
           "the prior; StreamingLLM keeps the sinks and the most "
           "recent tokens.\n")
out.append("**Recovered** is the Q-Filters paper's metric: the share of StreamingLLM's perplexity increase over "
           "the full cache that a policy wins back, (PPL_stream − PPL_policy) / (PPL_stream − PPL_full); 0% is "
           "StreamingLLM, 100% the full cache, negative is worse than StreamingLLM.\n")

missing_notes = []
def summary_section(ppl, pk, nd, tune):
    """One row per (policy, budget): its best perplexity at that budget (4096 tokens) with the
    share recovered and tok/s, and its retrieval in 1024-token documents at that budget (the
    ratio 1024 / budget: 2x at 512, 4x at 256), key at depth 0.2, best setting of each."""
    full = next((r for r in ppl if r["policy"] == "none"), None)
    budgets = sorted({r["budget"] for r in ppl if r["budget"]})
    policies = []
    for r in ppl + pk + nd:
        if r["policy"] != "none" and r["policy"] not in policies:
            policies.append(r["policy"])

    def retrieval(rows, policy, budget):
        best = None
        for r in rows:
            if r["policy"] != policy or r["length"] != 1024 or r["depth"] != 0.2:
                continue
            if not r.get("ratio") or round(1024 / r["ratio"]) != budget:
                continue
            hits = round(r["accuracy"] * r["trials"])
            key = (hits / r["trials"], -r["answer_nll"])
            if best is None or key > best[0]:
                best = (key, hits, r["trials"], r.get("key_kept"))
        if best is None:
            return "", ""
        _, hits, n, kept = best
        return f"{hits}/{n}", ("" if kept is None else f"{100 * kept:.0f}%")

    rows = []
    for b in budgets:
        s = next((x for x in ppl if x["policy"] == "streaming" and x["budget"] == b), None)
        for p in policies:
            cands = [r for r in ppl if r["policy"] == p and r["budget"] == b]
            best = min(cands, key=lambda r: r["ppl"]) if cands else None
            pk_rate, pk_kept = retrieval(pk, p, b)
            nd_rate, nd_kept = retrieval(nd, p, b)
            if best is None and not (pk_rate or nd_rate):
                continue
            rec = recovered(s["ppl"], full["ppl"], best["ppl"]) if best and s and full else None
            cells = ["", "", "", ""]
            if best:
                cells = [f'{best["ppl"]:.2f}', pct(rec), cfg(best), f'{best["tok_s"]:.0f}']
            rows.append((b, best["ppl"] if best else float("inf"),
                         f"| {p} | {b} | " + " | ".join(cells + [pk_rate, pk_kept, nd_rate, nd_kept]) + " |"))
    if not rows:
        return ""
    out = ["### Summary: policy × budget\n",
           "Each policy's best row at each budget, from the tables below: perplexity on 4096 held-out tokens "
           "(recovered: share of StreamingLLM's drop won back; tok/s of that run, comparable only within a "
           "session), and passkey and needle retrieval in 1024-token documents held in the same budget (4× "
           "compression at 256, 2× at 512), key at depth 0.2, 10 documents; key kept: share of the answer's "
           "slots still cached when the question has been read. A blank cell was not measured."]
    if full:
        out.append(f'Full cache: PPL {full["ppl"]:.2f}.')
    out.append("")
    out.append("| policy | budget | PPL | recovered | setting of the PPL row | tok/s | passkey | key kept | needle | key kept |")
    out.append("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    out += [r[2] for r in sorted(rows, key=lambda r: (r[0], r[1]))]
    chosen = [r for r in tune if r.get("chosen")]
    if chosen:
        c = chosen[0]
        out.append(f'\n`calibrate --tune` chose **{c.get("policy", "qfilters")}** (recency {c["recency"]:g}, '
                   f'window {c["window"]}, {c["granularity"]}); why: the next section.')
    out.append("")
    return "\n".join(out)


for prefix, title in MODELS:
    tune = load(f"{prefix}_tune.json")
    ppl = []
    for p in sorted(glob.glob(os.path.join(d, f"{prefix}_ppl*.json"))):
        ppl += json.load(open(p))
    pk, nd = [], []
    for p in sorted(glob.glob(os.path.join(d, f"{prefix}_passkey_*.json"))):
        pk += json.load(open(p))
    for p in sorted(glob.glob(os.path.join(d, f"{prefix}_needle_*.json"))):
        nd += json.load(open(p))
    front = load(f"{prefix}_frontier_ppl.json")
    if not (tune or ppl or pk or nd or front or load(f"{prefix}_frontier_passkey.json")):
        continue
    out.append(f"## {title}\n")
    summary = summary_section(ppl, pk, nd, tune)
    if summary:
        out.append(summary)
    if tune:
        out.append(tune_section(tune))
    if ppl:
        t = ppl[0]
        out.append("### Streaming perplexity\n")
        out.append(f'{t["tokens"]} tokens of `{os.path.basename(t["text"])}` (held out), chunks of {t["chunk"]}; '
                   f'PPL over all scored tokens and over the second half; peak cells = budget + one chunk.\n')
        full = next((r for r in ppl if r["policy"] == "none"), None)
        out.append("| policy | budget | setting | PPL | recovered | PPL 2nd half | recovered 2nd half | tok/s | peak cells |")
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in sorted(ppl, key=lambda r: (r["budget"] or 10**9, r["ppl"])):
            rec = rec2 = None
            s = next((x for x in ppl if x["policy"] == "streaming" and x["budget"] == r["budget"]), None)
            if full and s and r["policy"] != "none":
                rec = recovered(s["ppl"], full["ppl"], r["ppl"])
                rec2 = recovered(s["ppl_second_half"], full["ppl_second_half"], r["ppl_second_half"])
            out.append(f'| {r["policy"]} | {r["budget"] or "–"} | {cfg(r)} | {r["ppl"]:.2f} | {pct(rec)} | '
                       f'{r["ppl_second_half"]:.2f} | {pct(rec2)} | {r["tok_s"]:.0f} | {r["peak_cells"]} |')
        for r in ppl:
            if "full_context_ppl" in r:
                out.append(f'\nFull-cache check: streaming `none` PPL {r["ppl"]:.3f} vs one-context computation '
                           f'{r["full_context_ppl"]:.3f}.')
        # The bar, per budget: Q-Filters against the better of StreamingLLM and K-norm.
        lines = []
        for b in sorted({r["budget"] for r in ppl if r["budget"]}):
            row = {r["policy"]: r for r in ppl if r["budget"] == b}
            if not all(k in row for k in ("qfilters", "streaming", "knorm")):
                continue
            parts = []
            for key, name in (("ppl", "all"), ("ppl_second_half", "2nd half")):
                best = min(row["streaming"][key], row["knorm"][key])
                ratio = row["qfilters"][key] / best
                parts.append(f'{name}: {row["qfilters"][key]:.2f} / {best:.2f} = {ratio:.3f} '
                             f'({"meets" if ratio <= BAR else "misses"} ≤ {BAR})')
            lines.append(f"- budget {b}: Q-Filters / better baseline, " + "; ".join(parts))
        if lines:
            out.append("\nThe bar (Q-Filters PPL ≤ 0.97 × the better of StreamingLLM and K-norm):\n")
            out += lines
        out.append("")
    if front:
        out.append(frontier_section(prefix, front))
    pk_front = load(f"{prefix}_frontier_passkey.json")
    if pk_front:
        out.append(passkey_frontier_section(prefix, pk_front))
    retrieval = (
        (pk, "Passkey retrieval", "Exact match of the greedy 5-digit answer (rate with its Wilson 95% interval), and "
         "mean NLL per answer token under teacher forcing (same policy). Budget = document tokens / ratio; chat "
         "prompt; filler from tinyshakespeare. Key kept: share of the key's (layer, KV head, digit token) slots "
         "still cached when the question has been read (blank where the run predates that measure).", "exact"),
        (nd, "Needle retrieval", "`qfilters eval needle`: a sentence \"The best thing to do in CITY is to "
         "ACTIVITY.\" hidden in prose (wikitext2-valid), the question asks for the city's activity; found when the "
         "greedy reply contains the activity (rate with its Wilson 95% interval). `needle-N`: N such sentences "
         "about N cities, one asked. Answer NLL: of the answer's first token. Key kept: share of the activity's "
         "(layer, KV head, token) slots still cached when the question has been read.", "found"),
    )
    for rows, heading, caption, word in retrieval:
        if not rows:
            continue
        out.append(f"### {heading}\n")
        out.append(caption + "\n")
        out.append(f"| task | policy | setting | ratio | length | depth | {word} | 95% interval | answer NLL | key kept | documents |")
        out.append("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|")
        agg = {}
        for r in rows:
            k = (r.get("task", "passkey"), r["policy"], cfg(r), r.get("ratio") or 0, r["length"], r["depth"])
            a = agg.setdefault(k, [0, 0.0, 0, []])
            a[0] += round(r["accuracy"] * r["trials"]); a[1] += r["answer_nll"] * r["trials"]; a[2] += r["trials"]
            if r.get("key_kept") is not None:
                a[3].append((r["key_kept"], r["trials"]))
        order = {"none": 0, "streaming": 1, "knorm": 2, "qfilters": 3, "keydiff": 4, "keydiff-live": 5,
                 "expected-attention": 6}
        for (task, p, c, ratio, length, depth), (hits, nll, n, kept) in sorted(
                agg.items(), key=lambda kv: (kv[0][0], kv[0][4], kv[0][5], kv[0][3], order.get(kv[0][1], 9), kv[0][2])):
            lo, hi = wilson(hits, n)
            out.append(f'| {task} | {p} | {c} | {ratio or "–"} | {length} | {depth:g} | {hits}/{n} = {100 * hits / n:.0f}% | '
                       f'{100 * lo:.0f}–{100 * hi:.0f}% | {nll / n:.2f} | {kept_cell(p, kept)} | {n} |')
        out.append("")

    # How much text calibration needs (scripts/calibration-curve.sh, written up by hand).
    cal = os.path.join(d, f"{prefix}_calibration.md")
    if os.path.exists(cal):
        out.append("### Calibration: samples against cosine\n")
        out.append(open(cal).read())

notes = os.path.join(d, "notes.md")
if os.path.exists(notes):
    out.append(open(notes).read())
cmds_path = os.path.join(d, "steps.txt")
if not os.path.exists(cmds_path):
    cmds_path = os.path.join(d, "commands.txt")
if os.path.exists(cmds_path):
    # A step listed twice (two runs listing at once) is shown once, in its first place.
    cmds = list(dict.fromkeys(open(cmds_path).read().splitlines()))
    done, todo = [], []
    for c in cmds:
        m = re.search(r"--(?:tune-)?json (\S+)", c) or re.search(r" -o (\S+)$", c)
        (done if m and os.path.exists(m.group(1)) else todo).append(c)
    out.append("## Commands\n\nRun (their JSON is in `docs/results/`):\n\n```\n" + "\n".join(done) + "\n```\n")
    if todo:
        out.append("Listed by `scripts/results.sh` but not run yet (`RESUME=1 scripts/results.sh` runs them and "
                   "keeps the rest):\n\n```\n" + "\n".join(todo) + "\n```\n")
print("\n".join(out))
