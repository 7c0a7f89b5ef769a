"""The diffusion objective (chibisplat.training.objective) against the DDPM formulas computed by hand.

The SD1.5 noise schedule is rebuilt here in float64 from its definition (``scaled_linear``: betas are the squares of
a linspace between sqrt(beta_start) and sqrt(beta_end); abar_t = prod_{s<=t} (1 - beta_s)), so a wrong schedule,
a swapped argument of ``add_noise`` / ``get_velocity`` or a sign in ``predict_x0`` changes a compared value.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chibisplat.protocol import NUM_INPUT_VIEWS
from chibisplat.training.objective import (
    SD15_SCHEDULER_CONFIG,
    Batch,
    diffusion_step_inputs,
    noise_scheduler,
    predict_x0,
    step_generator,
)

TINY_STACK = SimpleNamespace(sd15_path=None)  # noise_scheduler only reads this field
TIMESTEPS = [0, 1, 137, 500, 998, 999]


def alphas_cumprod_by_hand() -> np.ndarray:
    c = SD15_SCHEDULER_CONFIG
    assert c["beta_schedule"] == "scaled_linear"
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"], dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_sd15_schedule_matches_its_definition():
    abar = alphas_cumprod_by_hand()
    sched = noise_scheduler(TINY_STACK)
    assert sched.config.prediction_type == "epsilon"
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), abar, rtol=2e-6)
    # Published endpoints of SD1.5's schedule.
    assert abar[0] == pytest.approx(1 - 0.00085, abs=1e-12)
    assert abar[-1] == pytest.approx(0.0046601, abs=1e-7)


def _batch(b: int = 2, h: int = 3) -> Batch:
    g = torch.Generator().manual_seed(7)
    c2w = torch.eye(4).repeat(b, 8, 1, 1)
    c2w[..., 2, 3] = 1.4
    return Batch(
        latents=torch.randn(b, NUM_INPUT_VIEWS, 4, h, h, generator=g, dtype=torch.float64),
        C2W=c2w,
        fxfycxcy=torch.tensor([1.3889, 1.3889, 0.5, 0.5]).repeat(b, 8, 1),
        target_rgba=torch.zeros(b, 8, 4, 2, 2, dtype=torch.uint8),
        prompt_embeds=torch.arange(b, dtype=torch.float32)[:, None, None].expand(b, 77, 768) + 1.0,
        index=torch.arange(b),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_inputs_and_targets_follow_ddpm(prediction_type):
    abar = alphas_cumprod_by_hand()
    sched = noise_scheduler(TINY_STACK, prediction_type)
    batch = _batch()
    scaling = lambda z: 0.5 * z + 0.25  # a scaling that is not the identity: x0 must be scaling(latents)
    null = torch.zeros(77, 768)
    seen_t = set()
    for step in range(6):  # several draws: timesteps from early and late in the schedule
        inp = diffusion_step_inputs(batch, sched, scaling, null, 0.0, 24, step_generator(3, step))
        x0, eps, t = inp["x0"].double(), inp["noise"].double(), inp["timesteps"]
        assert torch.equal(x0, (0.5 * batch.latents + 0.25).reshape(-1, 4, 3, 3))  # views flattened object-major
        assert t.shape == (2 * NUM_INPUT_VIEWS,) and (t.reshape(2, NUM_INPUT_VIEWS) == t[::NUM_INPUT_VIEWS, None]).all()
        seen_t.update(t.tolist())
        a = torch.from_numpy(abar[t.numpy()]).reshape(-1, 1, 1, 1)
        expected_noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        torch.testing.assert_close(inp["noisy"].double(), expected_noisy, rtol=0, atol=1e-5)
        if prediction_type == "epsilon":
            expected_target = eps
        else:
            expected_target = a.sqrt() * eps - (1 - a).sqrt() * x0
        torch.testing.assert_close(inp["target"].double(), expected_target, rtol=0, atol=1e-5)
        # The UNet sees [noisy latent, Plücker] and the text of its object, repeated per view (no CFG drop here).
        torch.testing.assert_close(inp["unet_input"][:, :4].double(), expected_noisy, rtol=0, atol=1e-5)
        assert torch.equal(inp["encoder_hidden_states"][:, 0, 0], torch.tensor([1.0] * 4 + [2.0] * 4))
    assert len(seen_t) >= 6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_add_noise(prediction_type):
    """x0 -> (noisy, model output) by hand -> predict_x0 gives x0 back, at every chosen timestep."""
    abar = alphas_cumprod_by_hand()
    sched = noise_scheduler(TINY_STACK, prediction_type)
    g = torch.Generator().manual_seed(1)
    n = len(TIMESTEPS)
    x0 = torch.randn(n, 4, 2, 3, generator=g, dtype=torch.float64) * 2.0
    eps = torch.randn(n, 4, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor(TIMESTEPS)
    a = torch.from_numpy(abar[TIMESTEPS]).reshape(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    got = predict_x0(pred, noisy, t, sched)
    # The scheduler keeps abar in float32: the epsilon inversion divides by sqrt(abar) (0.068 at t=999).
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-5)
    # ... and it is the scheduler's own add_noise it inverts.
    noisy_sched = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(predict_x0(pred, noisy_sched, t, sched), x0, rtol=0, atol=1e-5)


def test_unknown_prediction_type_is_an_error():
    sched = noise_scheduler(TINY_STACK, "sample")
    with pytest.raises(ValueError, match="sample.*epsilon \\| v_prediction"):
        diffusion_step_inputs(_batch(), sched, lambda z: z, torch.zeros(77, 768), 0.0, 24, step_generator(0, 0))
