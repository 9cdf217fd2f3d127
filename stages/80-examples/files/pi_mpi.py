"""pi from one MPI world: every rank integrates its share of 4 / (1 + x^2) over [0, 1] by the
midpoint rule, rank 0 adds the shares up and checks the sum against math.pi.

    sbatch pi.sbatch                  # every compute node, one rank per core (pi-<job>.out)
    srun -N2 -n8 python3 pi_mpi.py    # or straight from the shell
    srun -N2 -n8 python3 pi_mpi.py 50000000    # more intervals: more work per rank

Slurm starts the ranks and mpi4py joins them into one world (slurm.conf: MpiDefault=pmix).
"""

import math
import sys

from mpi4py import MPI

intervals = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
TOLERANCE = 1e-9  # the midpoint rule's error at 2 million intervals is far below this

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
t0 = MPI.Wtime()
h = 1.0 / intervals
share = 0.0
for i in range(rank, intervals, size):  # rank r takes intervals r, r + size, r + 2 size, ...
    x = h * (i + 0.5)
    share += 4.0 / (1.0 + x * x)
pi = comm.reduce(share * h, op=MPI.SUM, root=0)
hosts = comm.gather(MPI.Get_processor_name(), root=0)
seconds = comm.reduce(MPI.Wtime() - t0, op=MPI.MAX, root=0)

if rank == 0:
    error = abs(pi - math.pi)
    nodes = sorted(set(hosts))
    print(f"pi = {pi:.12f} from {size} ranks on {len(nodes)} nodes ({' '.join(nodes)})")
    print(f"{intervals} intervals in {seconds:.2f} s; error {error:.1e}")
    if error < TOLERANCE:
        print("result: OK")
    else:
        print(f"result: WRONG (error above {TOLERANCE})")
        sys.exit(1)
