"""Attention transfer plus soft targets: CE + at + 0.9 x st; CIFAR-100.

ResNet-20 >> ResNet-20 by default, as in the reference's table; `:depth=110` for the 110-layer cell.
Two methods combined by configuration ('at+st'); the reference weighs st 0.9
(configs/default.py).
  python main.py --config=configs/at_st_cifar100.py --workdir=runs/
  python main.py --config=configs/at_st_cifar100.py:depth=110 --workdir=runs/
  python main.py --config=configs/at_st_cifar100.py:smoke --workdir=runs/   # about a minute on a CPU
"""
from configs import default


def get_config(arg=None):
  return default.get_config(arg, method='at+st', dataset='cifar100')
