"""Train the shipped ``shapes-sd`` pipeline from scratch, reproducibly, on this generator's images.

    python -m accel.pipelines.shapes_train [--out DIR] [--vae-steps N] [--unet-steps N]

Stages (fixed step counts and seeds, so the result does not depend on the machine's speed):
1. render a fixed pool of captioned images (``accel.pipelines.shapes.dataset``);
2. train the ``AutoencoderKL`` (L1 + MSE + a small KL term) and set its ``scaling_factor`` from the latents' spread;
3. encode the pool once, then train the UNet and the text encoder together with the epsilon objective, min-SNR
   weighting, 10 % caption dropout (for classifier-free guidance) and an EMA of the weights, which is what ships.
   AdamW peaks at 2e-3 (one cycle): at 1000 steps it reached the adherence 5e-4 needed 4800 steps for (0.41 against
   0.23 at 1000 steps), and 4e-3 diverged;
4. save the pipeline in fp16 (loaded back in fp32) with ``training.json``: time, device, losses.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from accel.pipelines import shapes


def train(
    out: Path,
    pool_size: int = 60_000,
    vae_steps: int = 1_200,
    unet_steps: int = 4_000,
    batch_size: int = 32,
    unet_lr: float = 2e-3,
    seed: int = 0,
    threads: int | None = None,
    log_every: int = 100,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    record: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pool_size": pool_size,
        "batch_size": batch_size,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "unet_lr": unet_lr,
        "seed": seed,
        "resolution": shapes.BASE_RESOLUTION,
    }

    images, scenes = shapes.dataset(pool_size, seed=seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8, converted per batch to save memory
    record["data_seconds"] = time.perf_counter() - started
    print(f"rendered {pool_size} images in {record['data_seconds']:.0f} s", flush=True)

    pipe = shapes.build_untrained_pipeline(seed=seed)
    generator = torch.Generator().manual_seed(seed)

    vae_started = time.perf_counter()
    record["vae_loss"] = _train_vae(pipe.vae, pixels, vae_steps, batch_size, generator, device, log_every)
    record["vae_seconds"] = time.perf_counter() - vae_started
    record["vae_reconstruction_detector_accuracy"] = _reconstruction_accuracy(pipe.vae, device)
    print(f"detector on VAE reconstructions: {record['vae_reconstruction_detector_accuracy']:.3f}", flush=True)

    latents = _encode(pipe.vae, pixels, device)
    scaling_factor = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    record["scaling_factor"] = scaling_factor

    token_ids = pipe.tokenizer(
        [s.caption for s in scenes],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_ids = pipe.tokenizer(
        [""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids

    unet_started = time.perf_counter()
    ema_unet, ema_text, losses = _train_unet(
        pipe, latents, token_ids, empty_ids, unet_steps, batch_size, generator, device, log_every, lr=unet_lr
    )
    record["unet_seconds"] = time.perf_counter() - unet_started
    record["unet_loss"] = losses
    pipe.unet.load_state_dict(ema_unet.state_dict())
    pipe.text_encoder.load_state_dict(ema_text.state_dict())

    record["total_seconds"] = time.perf_counter() - started
    _save(pipe, out, record)
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, list)}, indent=2), flush=True)
    return record


def _batches(count: int, steps: int, batch_size: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, count, (batch_size,), generator=generator)


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def _train_vae(vae, pixels, steps, batch_size, generator, device, log_every) -> list[float]:
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    history, running = [], []
    for step, index in enumerate(_batches(len(pixels), steps, batch_size, generator), 1):
        x = _to_unit_range(pixels[index]).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=None)
            reconstruction = vae.decode(z).sample.float()
        kl = posterior.kl().mean()
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            history.append(float(np.mean(running)))
            print(f"vae step {step}/{steps} loss {history[-1]:.4f}", flush=True)
            running = []
    vae.eval()
    return history


@torch.no_grad()
def _reconstruction_accuracy(vae, device, count: int = 200, seed: int = 10_007) -> float:
    """Share of held-out images whose autoencoder round trip the detector still reads exactly: the ceiling on what
    the UNet's pictures can score."""
    from accel.pipelines import shapes_detector

    images, scenes = shapes.dataset(count, seed=seed)
    x = _to_unit_range(torch.from_numpy(images).permute(0, 3, 1, 2)).to(device)
    decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pixels = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    hits = sum(
        shapes_detector.matches_exactly(shapes_detector.detect(p), s) for p, s in zip(pixels, scenes, strict=True)
    )
    return hits / count


@torch.no_grad()
def _encode(vae, pixels, device, chunk: int = 256) -> torch.Tensor:
    latents = []
    for start in range(0, len(pixels), chunk):
        x = _to_unit_range(pixels[start : start + chunk]).to(device)
        latents.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(latents)


def _train_unet(
    pipe,
    latents,
    token_ids,
    empty_ids,
    steps,
    batch_size,
    generator,
    device,
    log_every,
    *,
    lr,
    snr_gamma=5.0,
):
    unet, text_encoder, scheduler = pipe.unet.to(device).train(), pipe.text_encoder.to(device).train(), pipe.scheduler
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.04)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_parameters = list(ema_unet.parameters()) + list(ema_text.parameters())
    alphas = scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    history, running = [], []
    for step, index in enumerate(_batches(len(latents), steps, batch_size, generator), 1):
        x0 = latents[index].to(device)
        ids = token_ids[index].clone()
        # 10 % empty captions teach the unconditional branch that classifier-free guidance needs.
        ids[torch.rand(len(ids), generator=generator) < 0.1] = empty_ids[0]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        text = text_encoder(ids.to(device))[0]
        prediction = unet(noisy, t, encoder_hidden_states=text).sample
        # min-SNR weighting: the high-noise steps that decide layout are not drowned by the easy low-noise ones.
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
            weight = torch.clamp(snr[t], max=snr_gamma) / (snr[t] + 1)
        else:
            target = noise
            weight = torch.clamp(snr[t], max=snr_gamma) / snr[t]
        loss = (weight * ((prediction - target) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            history.append(float(np.mean(running)))
            print(f"unet step {step}/{steps} loss {history[-1]:.4f}", flush=True)
            running = []
    return ema_unet, ema_text, history


def _save(pipe, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(torch.float32)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    record["saved_megabytes"] = round(size / 2**20, 2)
    (out / "training.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=shapes.WEIGHTS_DIR)
    parser.add_argument("--pool-size", type=int, default=60_000)
    parser.add_argument("--vae-steps", type=int, default=1_200)
    parser.add_argument("--unet-steps", type=int, default=4_000)
    parser.add_argument("--unet-lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    train(
        args.out,
        pool_size=args.pool_size,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        unet_lr=args.unet_lr,
        seed=args.seed,
        threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
