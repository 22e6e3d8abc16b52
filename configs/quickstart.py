r"""The whole pipeline on scikit-learn's bundled digits, on a CPU, in minutes (no download).

  python launch.py --config=configs/quickstart.py --workdir=/tmp/alphanet-quickstart

Trains a tiny supernet (8x8 digits upsampled to 24x24, resolutions 16/24) with the sandwich rule and
the adaptive alpha-divergence, calibrates BN and evaluates the min and max subnets, runs a short
evolutionary search, exports the best subnet, and writes results.json, pareto.png and export/.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, steps=600)
    c = common.digits_quickstart("tiny", a["steps"])  # the tiny space runs at 16 and 24
    c.eval.subnets = "min,max"
    c.search.update(dict(parent_popu_size=12, mutate_size=6, crossover_size=6, evo_iter=3, flops_min=0.0,
                         flops_max=10.0, flops_step=0.1))
    c.export.max_mflops = 1.0
    c.latency.batch_size = 32  # at batch 1 these tiny nets take well under a ms: mostly dispatch
    c.search.latency_step = 0.1  # ms (search.objective=latency)
    return c
