"""Flow of solution procedure (Yim et al., CVPR 2017) in two forms (`form`).

- 'reference' (default): the seed reference's (hankyul2/KnowledgeDistillation) one-stage
  term, kd_jax.methods.reference: the mean of the consecutive pairs' Gram MSEs, / 3.
- 'repdistiller': RepDistiller's distiller_zoo/FSP.py on (stem, stage1..3): for each
  consecutive pair the larger map is average-pooled to the smaller, G[b, j, i] = mean over
  space of bot_i top_j, and the term is mean (G_s - G_t)^2; it needs equal channels.
  RepDistiller trains with these terms only in a 30-epoch init stage on the student's
  feature layers (`init_terms`, their plain sum), then plain cross-entropy. kd_jax's
  default (`init_epochs` 0) instead trains `weight` x their sum jointly with the
  cross-entropy in one stage, as mdistiller trains all its methods; RepDistiller's
  schedule is `init_epochs` 30 and `weight` 0. The init stage's terms are this form's
  whatever `form` says.
"""
import flax.linen as nn
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import reference
from kd_jax.methods.common import wide

FORMS = ('reference', 'repdistiller')


def block_mean(x, size):
  n, h, w, c = x.shape
  return x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))


def gram(bot, top):
  """RepDistiller's compute_fsp for one pair: [B, C_top, C_bot]."""
  if bot.shape[1] > top.shape[1]:
    bot = block_mean(bot, top.shape[1])
  elif bot.shape[1] < top.shape[1]:
    top = block_mean(top, bot.shape[1])
  return jnp.einsum('nhwi,nhwj->nji', bot, top) / (bot.shape[1] * bot.shape[2])


def repdistiller_terms(student, teacher):
  names = ['stem', *reference.stages(student)]
  for k in names:
    if student[k].shape[-1] != teacher[k].shape[-1]:
      raise ValueError(f"fsp (form 'repdistiller') needs equal channels: {k} has "
                       f'{student[k].shape[-1]} vs {teacher[k].shape[-1]}')
  s = [wide(student[k]) for k in names]
  t = [wide(teacher[k]) for k in names]
  return {f'fsp_pair{i + 1}': jnp.mean(jnp.square(gram(s[i], s[i + 1]) - gram(t[i], t[i + 1])))
          for i in range(len(names) - 1)}


class FSP(nn.Module):
  cfg: object

  def __call__(self, student, teacher, batch, progress, train: bool = True):
    if self.cfg.form == 'reference':
      return reference.fsp_loss(self.cfg, student, teacher, batch, progress)
    return {'fsp': self.cfg.weight * sum(repdistiller_terms(student, teacher).values())}

  def init_terms(self, student, teacher, batch, progress, train: bool = True):
    """RepDistiller's init-stage terms (form 'repdistiller'; their sum is trained)."""
    del batch, progress, train
    return repdistiller_terms(student, teacher)


FSP_METHOD = methods.register(methods.Method(
    name='fsp', doc="Flow of solution procedure (Yim et al.): the seed reference's form or "
    "RepDistiller's (see `form`).",
    build=lambda cfg, ctx: FSP(cfg), teacher_bn_mode='batch',
    init_stage='student_features+method_params',
    fields={
        'weight': methods.Field(1.0, 'weight of the FSP term (the reference: 1; RepDistiller '
                                "form: weight of the pair terms' sum in the joint form)",
                                methods.non_negative, 'a number >= 0'),
        'form': methods.Field('reference', "'reference' (the seed's one-stage form) or "
                              "'repdistiller' (RepDistiller's FSP.py terms)",
                              lambda v: v in FORMS, ' or '.join(map(repr, FORMS))),
        **methods.init_stage_fields(30),
    }))
