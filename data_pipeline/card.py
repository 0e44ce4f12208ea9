"""The dataset card, as a person reads it on the console."""


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def format_card(card: dict, output: str) -> str:
    tok = card["tokenizer"]
    learned = tok["learned_vocab_size"]
    lines = [
        f"dataset card: {output.rstrip('/')}/dataset.json",
        f"source: {card['source']}",
        f"tokenizer: {tok['kind']} base vocab {tok['base_vocab_size']}"
        + (f", learned vocab {learned}" if learned else "")
        + f", model vocab {tok['vocab_size']} ({len(tok['labels'])} label tokens), "
        f"hash {tok['hash'][:12]}",
    ]
    if "lineage" in tok:
        lineage = tok["lineage"]
        lines.append(
            f"tokenizer extends {lineage['parent'][:12]} with {', '.join(lineage['added_labels'])}"
        )
    lines += [
        "",
        f"{'split':<6} {'pieces':>8} {'tokens':>9} {'notes':>9} {'hours':>7} {'shards':>6}",
    ]
    for name, split in card["splits"].items():
        lines.append(
            f"{name:<6} {split['pieces']:>8} {_count(split['tokens']):>9} "
            f"{_count(split['notes']):>9} {split['duration_s'] / 3600:>7.2f} "
            f"{len(split['shards']):>6}"
        )
    collections = card.get("collections", {})
    if len(collections) > 1:
        lines += [
            "",
            f"{'collection':<20} {'pieces':>8} {'tokens':>9} {'notes':>9} {'hours':>7} "
            f"{'test':>6} {'quarantined':>11}",
        ]
        for name, c in collections.items():
            lines.append(
                f"{name[:20]:<20} {c['pieces']:>8} {_count(c['tokens']):>9} "
                f"{_count(c['notes']):>9} {c['duration_s'] / 3600:>7.2f} "
                f"{c['test_pieces']:>6} {c['quarantined']:>11}"
            )
    files, failures = card["files"], card["failures"]
    lines += [
        "",
        f"files: {files['total']} seen, {files['ok']} ok, {files['duplicates']} duplicates, "
        f"{files['quarantined']} quarantined (failures.jsonl)",
    ]
    lines += [f"  {reason}: {n}" for reason, n in failures["by_reason"].items()]
    rates = [
        f"{s['files_per_s']:.1f} files/s, {s['tokens_per_s']:.0f} tokens/s" for s in card["slices"]
    ]
    lines.append("throughput: " + "; ".join(rates))
    return "\n".join(lines)
