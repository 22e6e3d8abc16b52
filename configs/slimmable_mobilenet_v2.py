r"""Universally slimmable MobileNetV2 trained with the sandwich rule and alpha-divergence (AlphaNet's
second experiment, on US-Nets' space).

  python launch.py --config=configs/slimmable_mobilenet_v2.py --workdir=/tmp/slim \
      --config.data.root=/path/to/imagenet        # ImageFolder: train/<class>/*.JPEG, val/<class>/*
  python launch.py --config=configs/slimmable_mobilenet_v2.py:digits --workdir=/tmp/slim-digits   # CPU, minutes

The space (`spaces.SLIMMABLE_MOBILENET_V2_SPACE`): MobileNetV2 at 224 with ONE width multiplier
m in [0.35, 1.0] (US-Nets' 27 widths, step 0.025) scaling every layer, channels make_divisible(c x m, 8),
the last 1x1 conv fixed at 1280: 300.77 MFLOPs / 3.50 M params at 1.0x, 59.29 MFLOPs at 0.35x. Per-width
BN statistics come from post-training calibration (`evaluate` / `search` / `export` calibrate each
width before measuring it). Subnets are named by multiplier: --config.eval.subnets=1.0x,0.5x,0.35x.

Recipe: US-Nets' (`us_mobilenet_v2_train_val.yml`) where the pipeline can express it: global batch
1024, lr 0.5 (base 0.125 x 1024/256), 250 epochs, no warm-up, n=4 sandwich (max, 2 random, min), no
dropout, random-resized crop with scale (0.25, 1) + flip; the schedule is this project's cosine (US-Nets
decays linearly), the students learn through the adaptive alpha-divergence (AlphaNet) instead of
US-Nets' KL, and weight decay 4e-5 applies to every kernel (US-Nets uses 1e-4 but skips depthwise
and BN; the optimizer here decays all kernels, so MobileNetV2's usual 4e-5 is used). US-Nets' colour
jitter and lighting noise are not in the pipeline. Arguments after the colon:
  :digits          the whole pipeline (train, evaluate, search, export) on scikit-learn's digits with
                   the tiny slimmable space (resolution 24, multipliers 0.35/0.5/0.75/1.0); steps=N
  :tfds            read the prepared TFDS `imagenet2012` instead of an ImageFolder
The hardware needs no argument (configs/alphanet.py): model.dtype=auto.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, digits=False, steps=600, tfds=False)
    if a["digits"]:
        return _digits(a["steps"])
    c = common.base_config("slimmable_mobilenet_v2", "tfds" if a["tfds"] else "imagefolder")
    c.batch_size = 1024
    c.num_epochs = 250
    c.warmup_epochs = 0
    c.optim.base_lr = 0.125  # x 1024 / 256 = 0.5, US-Nets' learning rate
    c.optim.weight_decay = 4e-5
    c.sandwich.dropout = 0.0
    c.sandwich.drop_connect = 0.0
    c.data.augment = "flip"
    c.data.crop_scale = (0.25, 1.0)
    c.checkpoint.every_steps = 1250  # about one epoch at batch 1024
    c.eval.every_steps = 1250 * 10
    c.eval.subnets = "1.0x,0.9x,0.8x,0.7x,0.6x,0.5x,0.4x,0.35x"
    c.eval.calib_batch_size = 256
    c.eval.calib_batches = 64
    # 27 subnets in all: the search evaluates each at most once; 1-MFLOP buckets keep every width apart.
    c.search.update(dict(parent_popu_size=27, mutate_size=8, crossover_size=8, evo_iter=3, flops_min=55.0,
                         flops_max=305.0, flops_step=1.0))
    c.export.max_mflops = 150.0
    return c


def _digits(steps):
    """configs/quickstart.py with the tiny slimmable space."""
    c = common.digits_quickstart("tiny_slimmable", steps)  # the tiny slimmable space runs at 24
    c.sandwich.dropout = 0.0
    c.sandwich.drop_connect = 0.0
    c.eval.subnets = "1.0x,0.75x,0.5x,0.35x"
    c.search.update(dict(parent_popu_size=6, mutate_size=3, crossover_size=3, evo_iter=2, flops_min=0.0,
                         flops_max=10.0, flops_step=0.01))
    c.export.max_mflops = 0.5
    return c
