"""One point of a parameter sweep: the Lyapunov exponent of the logistic map
x -> r x (1 - x) for one growth rate r. Negative: the population settles (a fixed point or a
cycle); positive: chaos. Run as a Slurm job array (sweep.sbatch), each array task takes the r
of its index and writes results/r-<r>.txt; `cat results/r-*.txt` shows the whole sweep.

    python3 sweep.py 3        # task 3 alone, to try it out

Below r = 3 the map settles on the fixed point 1 - 1/r, where the exponent is ln|2 - r|
exactly: those tasks check their answer against it.
"""

import math
import sys
from pathlib import Path

R_FIRST, R_STEP = 2.5, 0.2  # task i sweeps r = 2.5, 2.7, ... 3.9 for i = 0 ... 7
WARMUP, STEPS = 1_000, 100_000

task = int(sys.argv[1])
r = round(R_FIRST + R_STEP * task, 6)
x = 0.4
for _ in range(WARMUP):
    x = r * x * (1 - x)
total = 0.0
for _ in range(STEPS):
    x = r * x * (1 - x)
    total += math.log(abs(r * (1 - 2 * x)) or 1e-300)
exponent = total / STEPS

line = f"r={r:.3f} lyapunov={exponent:+.5f} {'chaos' if exponent > 0 else 'settles'}"
if r < 3:
    expected = math.log(abs(2 - r))
    ok = abs(exponent - expected) < 1e-3
    line += f" check={'OK' if ok else 'WRONG'} (expected {expected:+.5f})"
out = Path("results")
out.mkdir(exist_ok=True)
(out / f"r-{r:.3f}.txt").write_text(line + "\n")
print(line)
if r < 3 and not ok:
    sys.exit(1)
