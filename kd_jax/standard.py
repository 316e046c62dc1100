"""Facts of the CIFAR-100 benchmark of RepDistiller (CRD, ICLR 2020) and mdistiller (DKD,
CVPR 2022), used by configs/cifar100_standard.py and kd_jax.benchmark. No JAX here."""

# teacher>>student, in the order of the papers' tables (same-family pairs first).
PAIRS = ('resnet56>>resnet20', 'resnet110>>resnet20', 'resnet110>>resnet32',
         'resnet32x4>>resnet8x4', 'wrn_40_2>>wrn_16_2', 'wrn_40_2>>wrn_40_1', 'vgg13>>vgg8',
         'resnet32x4>>ShuffleV1', 'resnet32x4>>ShuffleV2', 'wrn_40_2>>ShuffleV1',
         'vgg13>>MobileNetV2', 'ResNet50>>MobileNetV2', 'ResNet50>>vgg8')
# Students trained with lr 0.01 instead of 0.05 (RepDistiller train_student.py,
# mdistiller configs/cifar100/*.yaml).
SMALL_LR_STUDENTS = ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')
# DKD's beta where mdistiller's configs/cifar100/dkd/<pair>.yaml sets one (8 otherwise).
DKD_BETA = {'resnet56>>resnet20': 2.0, 'resnet110>>resnet32': 2.0, 'vgg13>>MobileNetV2': 6.0,
            'vgg13>>vgg8': 6.0, 'wrn_40_2>>wrn_16_2': 6.0, 'wrn_40_2>>wrn_40_1': 6.0}
# The methods of the table, in the order of RepDistiller's README and then mdistiller's;
# 'base' is the vanilla student.
METHODS = ('base', 'kd', 'fitnet', 'at', 'sp', 'cc', 'vid', 'rkd', 'pkt', 'ab', 'ft', 'fsp',
           'nst', 'crd', 'kdsvd', 'ofd', 'reviewkd', 'dkd', 'dist')
# Methods whose RepDistiller schedule is a 30-epoch init stage (helper/pretrain.py), then
# the main stage without (ab, fsp: loss_kd 0) or with (ft: beta 200) their loss.
INIT_STAGE_METHODS = ('ab', 'ft', 'fsp')
INIT_EPOCHS = 30
# Students whose FT init stage RepDistiller runs at lr 0.01 whatever the main lr
# (helper/pretrain.py); the others at the main lr.
FT_INIT_LR_001_STUDENTS = ('resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56',
                           'resnet110', 'resnet8x4', 'resnet32x4', 'wrn_16_1', 'wrn_16_2',
                           'wrn_40_1', 'wrn_40_2')
