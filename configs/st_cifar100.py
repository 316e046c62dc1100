"""Soft targets (Hinton et al.): CE + T^2 KL(teacher || student) at T=4; CIFAR-100.

ResNet-20 >> ResNet-20 by default, as in the reference's table; `:depth=110` for the 110-layer cell.
  python main.py --config=configs/st_cifar100.py --workdir=runs/
  python main.py --config=configs/st_cifar100.py:depth=110 --workdir=runs/
  python main.py --config=configs/st_cifar100.py:smoke --workdir=runs/   # about a minute on a CPU
"""
from configs import default


def get_config(arg=None):
  return default.get_config(arg, method='st', dataset='cifar100')
