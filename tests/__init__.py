"""The test suite. Imported before any test module or conftest, so the setting below reaches every process of
the run: these, and the APIs, workers and CLIs they start, which inherit the environment.

One intra-op thread for torch and OpenMP: the suite's models are tiny, and three test processes share two cores,
where OpenMP's spin-waiting across oversubscribed threads cost more than the threads gained (the unit tier took
226 s with the default and 198 s with one thread on a 2-core AMD EPYC). A test about thread counts sets its own.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
