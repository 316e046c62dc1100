"""`logit`: regress the teacher's pooled features or logits (the reference's "Logits").

The reference (hankyul2/KnowledgeDistillation @f019dfc) regresses the 64-d pooled
features with an MSE; `target='logits'` regresses the real logits as Ba & Caruana do.
"""
from kd_jax import methods
from kd_jax.methods.common import mse


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  return {'logit': cfg.weight * mse(student[cfg.target], teacher[cfg.target])}


LOGIT = methods.register(methods.Method(
    name='logit', doc='MSE between the pooled features (or logits) of student and teacher.',
    build=methods.pure(_loss), teacher_bn_mode='batch',
    fields={
        'target': methods.Field('pooled', "what is regressed: 'pooled' (the reference's "
                                "code) or 'logits' (Ba & Caruana)",
                                lambda v: v in ('pooled', 'logits'), "'pooled' or 'logits'"),
        'weight': methods.Field(1.0, 'weight of the MSE (the reference: 1)',
                                methods.non_negative, 'a number >= 0'),
    }))
