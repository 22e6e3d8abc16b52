r"""AlphaNet supernet training on ImageNet: the reference recipe (spec §6).

  python launch.py --config=configs/alphanet.py --workdir=/tmp/alphanet \
      --config.data.root=/path/to/imagenet        # ImageFolder: train/<class>/*.JPEG, val/<class>/*

Global batch 2048 (base lr 0.1 x 2048/256), 5 warm-up + 360 epochs, sandwich rule with the adaptive
alpha-divergence, AutoAugment v0. Arguments after the colon:
  :tfds            read the prepared TFDS `imagenet2012` instead of an ImageFolder
Every field can be overridden: --config.batch_size=1024 --config.sandwich.distill=kl
The hardware needs no argument: model.dtype=auto computes in bfloat16 on GPU/TPU and float32 on CPU
(--config.model.dtype=float32 to change it), and each host reads with as many loader threads as it has
cores (at most 16; --config.data.num_workers).
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, tfds=False)
    c = common.base_config("alphanet", "tfds" if a["tfds"] else "imagefolder")
    c.model.skip_inactive_blocks = "auto"  # a long run: a faster step is worth a slower compile (common.py)
    # BN statistics over 32 images, as the reference's per-GPU BN (64 GPUs x 32, sync_bn off), whatever
    # the per-device batch here (ghost BN); calibration still uses whole batches of eval.calib_batch_size.
    c.model.bn_group_size = 32
    c.checkpoint.every_steps = 625  # about one epoch at batch 2048
    c.eval.every_steps = 625 * 10
    c.eval.calib_batch_size = 256
    c.eval.calib_batches = 64
    return c
