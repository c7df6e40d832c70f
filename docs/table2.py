"""A toy Table 2 (Calandriello et al. 2024, Tables 2 and 3): every algorithm's
default run for seeds 0, 1 and 2, judged side by side by the toy oracle.

    python docs/table2.py            # ~10-12 min on a quiet 2-core CPU; reruns skip finished runs
    python docs/table2.py --force    # retrain every run

Trains each script with its defaults plus `--seed S --output-dir
runs/table2/<algo>_s<S>` (one process at a time), runs evaluate.py on all 24
policies and pi_ref (assets/toy-t5, the "sft" row: every run starts from it)
with LABEL=PATH seed groups, then writes docs/table2.md: mean p(row > column)
over the 3 x 3 seed pairs (3 pairs against sft), ± the standard deviation of
those entries, as in the paper's tables. Not a test: a documented command.
"""
import argparse
import csv
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
# label -> command (defaults otherwise). The paper's Table 2 has the online
# algorithms, its Table 3 online vs offline and SFT; we put all in one matrix.
ALGORITHMS = {
    "online_ipo": ["online_ipo.py"],
    "ipo_md": ["ipo_md.py"],
    "online_dpo": ["online_ipo.py", "--loss", "dpo"],
    "online_slic": ["online_ipo.py", "--loss", "slic"],
    "nash_md_pg": ["nash_md.py"],
    "offline_ipo": ["ipo.py"],
    "offline_dpo": ["dpo.py"],
    "dro_v": ["dro_v.py"],
}
SFT = "assets/toy-t5"  # pi_ref, made by `python sft.py`


def run_dir(algo, seed):
    return os.path.join("runs", "table2", f"{algo}_s{seed}")


def train_all(force):
    for algo, cmd in ALGORITHMS.items():
        for seed in SEEDS:
            out = run_dir(algo, seed)
            # save_t5 moves model/ into place last: its config.json means the run finished
            if not force and os.path.exists(os.path.join(ROOT, out, "model", "config.json")):
                print(f"skip {out} (done; --force retrains)")
                continue
            if force and os.path.exists(os.path.join(ROOT, out)):
                subprocess.run(["rm", "-rf", os.path.join(ROOT, out)], check=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *cmd, "--seed", str(seed), "--output-dir", out], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            print(f"trained {out} in {time.perf_counter() - t0:.0f} s", flush=True)


def evaluate(eval_dir):
    policies = [f"sft={SFT}"] + [f"{a}={run_dir(a, s)}/model" for a in ALGORITHMS for s in SEEDS]
    subprocess.run([sys.executable, "evaluate.py", *policies, "--ref", SFT, "--output-dir", eval_dir],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def group_table(eval_dir):
    """Markdown: mean ± std over seed pairs (i != j) of p(row > column), from evaluate.py's csv."""
    with open(os.path.join(ROOT, eval_dir, "win_rates.csv")) as f:
        rows = list(csv.DictReader(f))
    names = list(dict.fromkeys(r["policy"] for r in rows))  # evaluate.py names seeds label, label#2, ...
    p = {(r["policy"], r["opponent"]): float(r["p_policy_beats_opponent"]) for r in rows}
    labels = ["sft", *ALGORITHMS]
    members = {g: [n for n in names if n.split("#")[0] == g] for g in labels}
    lines = ["| p(row > column) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for a in labels:
        cells = []
        for b in labels:
            v = np.array([p[i, j] for i in members[a] for j in members[b] if i != j])
            cells.append("0.500" if a == b else f"{v.mean():.3f} ± {v.std():.3f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    with open(os.path.join(ROOT, eval_dir, "policies.csv")) as f:
        stats = list(csv.DictReader(f))
    lines += ["", "| policy | KL(pi \\|\\| pi_ref) | length |", "|---|---|---|"]
    for g in labels:
        kl = [float(s["kl"]) for s in stats if s["policy"].split("#")[0] == g]
        ln = [float(s["length"]) for s in stats if s["policy"].split("#")[0] == g]
        lines.append(f"| {g} | {np.mean(kl):.2f} ± {np.std(kl):.2f} | {np.mean(ln):.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="retrain runs whose model already exists")
    args = parser.parse_args()
    t0 = time.perf_counter()
    train_all(args.force)
    eval_dir = os.path.join("runs", "table2", "evaluate")
    evaluate(eval_dir)
    table = group_table(eval_dir)
    header = ("<!-- written by `python docs/table2.py`; do not edit by hand -->\n"
              "Toy task, 256 test prompts judged by the oracle; each algorithm's default run for seeds 0, 1, 2. "
              "Entry: mean p(row > column) over the 3 x 3 seed pairs (3 pairs against sft = pi_ref = "
              "assets/toy-t5), ± the standard deviation of those entries (Calandriello et al. 2024, Tables 2-3). "
              "KL: sample estimate of KL(pi || pi_ref) from evaluate.py, mean ± std over seeds.\n\n")
    with open(os.path.join(ROOT, "docs", "table2.md"), "w") as f:
        f.write(header + table + "\n")
    print(table)
    print(f"\nwrote docs/table2.md ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
