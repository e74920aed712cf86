"""Plausible wrong answers, one per line: the kit's proof that its tests catch them.

Each mutant is (label, old, new): the reference solution's region with `old` replaced by `new`
(`old` must occur in the region exactly once). `tests/test_course.py` grades every mutant through
the same grader a student's submission goes through and checks that each scores below full marks
while the reference scores full marks; `python -m tinyldm.course mutants` prints the table.
"""

from __future__ import annotations

MUTANTS: dict[str, list[tuple[str, str, str]]] = {
    "noise_schedule": [
        ("cumulative sum instead of product", "torch.cumprod(1 - betas, dim=0)",
         "1 - torch.cumsum(betas, dim=0)"),
        ("product of the betas", "torch.cumprod(1 - betas, dim=0)",
         "1 - torch.cumprod(betas, dim=0)"),
        ("alpha_t instead of alpha_bar_t", "torch.cumprod(1 - betas, dim=0)", "(1 - betas)"),
        ("shifted by one step", "torch.cumprod(1 - betas, dim=0)",
         "torch.cat([torch.ones(1, dtype=betas.dtype), torch.cumprod(1 - betas, dim=0)[:-1]])"),
    ],
    "forward_process": [
        ("ignores its noise argument", "* noise", "* torch.randn_like(noise)"),
        ("noise with the wrong sign", "+ (1 - alpha_bar).sqrt() * noise",
         "- (1 - alpha_bar).sqrt() * noise"),
        ("alpha_t instead of alpha_bar_t", "alpha_bar = self.alpha_bar_at(t, x0)",
         "alpha_bar = self._at(1 - self.betas, t, x0)"),
        ("no square roots", "return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise",
         "return alpha_bar * x0 + (1 - alpha_bar) * noise"),
        ("coefficients swapped", "return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise",
         "return (1 - alpha_bar).sqrt() * x0 + alpha_bar.sqrt() * noise"),
    ],
    "ddim_step": [
        ("returns the predicted x0", "    sigma = eta", "    return x0\n    sigma = eta"),
        ("eta left out of sigma", "sigma = eta * (", "sigma = ("),
        ("x0 not scaled by sqrt(alpha_bar_prev)", "predicted_x0 = alpha_bar_prev**0.5 * x0",
         "predicted_x0 = x0"),
        ("alpha_bar_prev without its square root", "predicted_x0 = alpha_bar_prev**0.5 * x0",
         "predicted_x0 = alpha_bar_prev * x0"),
        ("sigma^2 not taken from the direction", "max(1 - alpha_bar_prev - sigma**2, 0.0)",
         "(1 - alpha_bar_prev)"),
        ("sigma with alpha_bar_t / alpha_bar_prev inverted", "(1 - alpha_bar_t / alpha_bar_prev)",
         "(1 - alpha_bar_prev / alpha_bar_t)"),
    ],
    "classifier_free_guidance": [
        ("the scale on the wrong term", "pred_u + guidance_scale * (pred_c - pred_u)",
         "pred_c + guidance_scale * (pred_u - pred_c)"),
        ("the conditional prediction only", "pred_u + guidance_scale * (pred_c - pred_u)",
         "pred_c"),
        ("scaled from the conditional side", "pred_u + guidance_scale * (pred_c - pred_u)",
         "pred_c + guidance_scale * (pred_c - pred_u)"),
        ("1 + s instead of s", "pred_u + guidance_scale * (pred_c - pred_u)",
         "pred_u + (1 + guidance_scale) * (pred_c - pred_u)"),
    ],
    "attention": [
        ("softmax over the queries", "scores.softmax(dim=-1)", "scores.softmax(dim=-2)"),
        ("no 1/sqrt(d)", " / math.sqrt(q.shape[-1])", ""),
        ("1/d instead of 1/sqrt(d)", "math.sqrt(q.shape[-1])", "q.shape[-1]"),
        ("masked scores set to 0, not -inf", 'float("-inf")', "0.0"),
        ("the mask ignored", "    if mask is not None:", "    if False:"),
    ],
    "cross_attention": [
        ("no residual", "x = x + self.cross_attn(", "x = self.cross_attn("),
        ("the self-attention's norm", "self.cross_attn(self.norm2(x)",
         "self.cross_attn(self.norm1(x)"),
        ("attends to x instead of the context", "self.norm2(x), context, context_mask)",
         "self.norm2(x), None, None)"),
        ("the context's padding attended to", "context, context_mask)", "context, None)"),
        ("no norm", "self.cross_attn(self.norm2(x)", "self.cross_attn(x"),
    ],
    "training_step": [
        ("target z0 instead of eps", "target = schedule.target(z0, eps, t, cfg.prediction).float()",
         "target = z0.float()"),
        ("no noise in z_t", "z_t = schedule.q_sample(z0, t, eps)",
         "z_t = schedule.q_sample(z0, t, 0 * eps)"),
        ("the network sees z0, not z_t", "pred = denoiser(z_t, t,", "pred = denoiser(z0, t,"),
        ("t not passed (always t = 0)", "pred = denoiser(z_t, t,", "pred = denoiser(z_t, 0 * t,"),
        ("the prediction detached", "concat=concat).float()",
         "concat=concat).float().detach().requires_grad_()"),
        ("the wrong sign of the target",
         "target = schedule.target(z0, eps, t, cfg.prediction).float()",
         "target = -schedule.target(z0, eps, t, cfg.prediction).float()"),
    ],
    "kl_term": [
        ("the sign flipped", "return 0.5 * (", "return -0.5 * ("),
        ("no 1/2", "return 0.5 * (", "return ("),
        ("a mean over (c, h, w), not a sum", ".sum(dim=(1, 2, 3))", ".mean(dim=(1, 2, 3))"),
        ("log variance used as the variance", "self.logvar.exp() - 1.0", "self.logvar - 1.0"),
        ("the log variance term left out", " - 1.0 - self.logvar)", " - 1.0)"),
    ],
    "vq_lookup": [
        ("argmax instead of argmin", "dist.argmin(dim=1)", "dist.argmax(dim=1)"),
        ("no straight-through (the codes, no gradient to the encoder)",
         "z_q = z_e + (e_k - z_e).detach()", "z_q = e_k"),
        ("straight-through the wrong way round", "z_q = z_e + (e_k - z_e).detach()",
         "z_q = e_k + (z_e - e_k).detach()"),
        ("the codes' norms left out of the distance", " + e.pow(2).sum(1)[None]", ""),
    ],
    "adaptive_weight": [
        ("no delta", "(grad_adv.float().norm() + delta)", "grad_adv.float().norm()"),
        ("not clamped", "lam.clamp(0.0, max_value).detach()", "lam.detach()"),
        ("the ratio inverted", "grad_rec.float().norm() / (grad_adv.float().norm() + delta)",
         "grad_adv.float().norm() / (grad_rec.float().norm() + delta)"),
        ("squared norms", "grad_rec.float().norm() / (grad_adv.float().norm() + delta)",
         "grad_rec.float().norm() ** 2 / (grad_adv.float().norm() ** 2 + delta)"),
    ],
}
