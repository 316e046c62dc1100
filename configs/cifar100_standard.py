"""The CIFAR-100 benchmark of RepDistiller (CRD, ICLR 2020) and mdistiller (DKD, CVPR
2022): their training recipe and their teacher >> student pairs.

  python main.py --config='configs/cifar100_standard.py:method=kd,pair=resnet32x4>>resnet8x4' --workdir=runs/
  python main.py --config='configs/cifar100_standard.py:method=dkd,pair=vgg13>>vgg8' --workdir=runs/
  python main.py --config='configs/cifar100_standard.py:method=kd,pair=wrn_40_2>>wrn_16_2,smoke' --workdir=runs/

The argument after ':' is a comma-separated list of `method=<m>` (any method or 'a+b'),
`pair=<teacher>>><student>` (quote it in a shell), `dataset=cifar10` (the same recipe on
CIFAR-10, with its own mean and std), `smoke` (2 epochs on 1,024 images).
The teacher is the baseline run of the teacher model under the same --workdir (trained
first with this recipe) unless --config.teacher.checkpoint names a .pth the projects
publish (e.g. cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth, {'model': ...}).

The recipe (RepDistiller train_student.py, mdistiller engine/cfg.py and
configs/cifar100/*.yaml): 240 epochs, batch 64, SGD momentum 0.9, weight decay 5e-4,
lr 0.05 (0.01 for MobileNetV2, ShuffleV1 and ShuffleV2 students), x0.1 after epochs 150,
180 and 210; random crop with zero padding 4 and horizontal flip; mean (0.5071, 0.4867,
0.4408), std (0.2675, 0.2565, 0.2761); the teacher's BatchNorm on running statistics.
DKD's beta per pair is mdistiller's configs/cifar100/dkd/<pair>.yaml (8 where it sets none).
AB, FT and FSP run RepDistiller's schedule: a 30-epoch init stage on their init terms
(helper/pretrain.py: constant lr, the main lr; FT's 0.01 for resnet and wrn students),
then the main stage without their loss (AB, FSP) or with it (FT, beta 200).
"""
from configs import default
from kd_jax import standard

PAIRS, SMALL_LR_STUDENTS, DKD_BETA = standard.PAIRS, standard.SMALL_LR_STUDENTS, standard.DKD_BETA


def parse_arg(arg):
  options = {'method': 'kd', 'pair': 'resnet32x4>>resnet8x4', 'dataset': 'cifar100',
             'smoke': False}
  for token in filter(None, (arg or '').split(',')):
    key, _, value = token.partition('=')
    if key not in options or (key == 'smoke') == bool(value):
      raise ValueError(f"bad config argument {token!r}; expected 'method=<method>', "
                       "'pair=<teacher>>><student>', 'dataset=<name>' and/or 'smoke'")
    options[key] = value or True
  if options['pair'].count('>>') != 1:
    raise ValueError(f"bad pair {options['pair']!r}; expected '<teacher>>><student>', e.g. "
                     f"one of: {', '.join(PAIRS)}")
  return options


def get_config(arg=None):
  options = parse_arg(arg)
  teacher, student = options['pair'].split('>>')
  config = default.get_config('smoke' if options['smoke'] else None,
                              method=options['method'], dataset=options['dataset'])
  config.model, config.teacher.model = student, teacher
  config.num_epochs = 240
  config.batch_size = 64
  config.learning_rate = 0.01 if student in SMALL_LR_STUDENTS else 0.05
  # The teacher's own recipe when it is trained here (not its student's lr).
  config.teacher.learning_rate = 0.01 if teacher in SMALL_LR_STUDENTS else 0.05
  config.lr_boundaries = (150, 180, 210)
  config.lr_decay = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.crop_padding = 'zero'
  if options['dataset'] == 'cifar100':  # the projects' own figures
    config.image_mean = (0.5071, 0.4867, 0.4408)
    config.image_std = (0.2675, 0.2565, 0.2761)
  # Both projects put the teacher in eval mode, except mdistiller's OFD, whose train()
  # leaves it in train mode (batch statistics).
  config.teacher.bn_mode = 'batch' if 'ofd' in config.distill else 'running'
  if 'dkd' in config.distill:
    config.distill.dkd.beta = DKD_BETA.get(options['pair'], 8.0)
  if 'fsp' in config.distill:  # RepDistiller's FSP, not the seed reference's
    config.distill.fsp.form = 'repdistiller'
  for name in standard.INIT_STAGE_METHODS:
    if name in config.distill:
      config.distill[name].init_epochs = standard.INIT_EPOCHS
      if name != 'ft':
        config.distill[name].weight = 0.0
  if 'ft' in config.distill and student in standard.FT_INIT_LR_001_STUDENTS:
    config.distill.ft.init_learning_rate = 0.01
  if options['smoke']:
    config.train_split, config.eval_split = 'train[:1024]', 'test[:512]'
    config.num_epochs, config.lr_boundaries = 2, (1,)
    for name in standard.INIT_STAGE_METHODS:
      if name in config.distill:
        config.distill[name].init_epochs = 1
  return config
