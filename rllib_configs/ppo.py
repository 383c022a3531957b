"""PPO with an action-masking RLModule on rap/ServingSim-v0 (the default model, its surrogate).

Run:
    rap train --config rllib_configs/ppo.py --env-runners 0 --out runs/ppo  # default: round 0
    rap train --config rllib_configs/ppo.py --smoke --out /tmp/ppo    # CI: 2 iterations
    RAY_ADDRESS=ray://head:10001 rap train --config ... --env-runners 8   # on a Ray cluster

Env runners split the training scenarios (`rap.agent.workloads`, split "train") between them and
sample in parallel (on a small shared machine pass `--env-runners 0`: sampling in the driver,
see docs/agent.md). Observations carry the one-shot scores' ranks (`RAP_TRAIN_SCORES` picks
another stored kind). Expect: the mean episode return (−Δ ln perplexity of the chosen mask minus
a small over-budget term; −20 for ending over budget) climbs from about −9 to about −1.2 within
20 iterations and ends near −0.8 (the bucket grid's huge deficits, capped at ln V, dominate
it); episodes are 9-13 removals. 120 iterations (240K env steps) take about 2 minutes on 2 idle
CPU cores. Output: out/policy/ (the RLModule folder and its checked plain export),
out/checkpoints/, out/train_log.jsonl, out/summary.json. `RAP_TRAIN_ITERATIONS` overrides the
length, `RAP_TRAIN_SEED` the seed (0); `--start-from DIR` continues from a trained policy. The
shipped policy is this config plus three DAgger rounds: scripts/train_policy.sh.
"""

from __future__ import annotations

import os

from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rap.agent.env import ServingSimEnv
from rap.agent.modules import MaskedPPOTorchRLModule
from rap.agent.train import TrainSpec

HIDDEN = [64, 64]


def make(smoke: bool = False, env_runners: int | None = None) -> TrainSpec:
    runners = env_runners if env_runners is not None else (1 if smoke else 2)
    env_config = {
        "model": "smollm2",
        "dtype": "float16",
        "split": "train",
        "scores": os.environ.get("RAP_TRAIN_SCORES", "oneshot"),
        "quality": "additive" if smoke else "surrogate",
        "per_worker": runners,
        "pool_size": 60 if smoke else 400,
    }
    config = (
        PPOConfig()
        .environment(ServingSimEnv, env_config=env_config)
        .env_runners(num_env_runners=runners, num_envs_per_env_runner=1 if smoke else 8)
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=256 if smoke else 2000,
            minibatch_size=128 if smoke else 250,
            num_epochs=2 if smoke else 8,
            lr=3e-4,
            gamma=1.0,
            lambda_=0.95,
            entropy_coeff=0.003,
            vf_clip_param=50.0,
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=MaskedPPOTorchRLModule,
                model_config={
                    "fcnet_hiddens": HIDDEN,
                    "fcnet_activation": "relu",
                    "head_fcnet_hiddens": [],
                    "vf_share_layers": False,
                },
            )
        )
        .debugging(seed=int(os.environ.get("RAP_TRAIN_SEED", 0)))
    )
    return TrainSpec(
        "ppo",
        config,
        iterations=int(os.environ.get("RAP_TRAIN_ITERATIONS", 0)) or (2 if smoke else 120),
        checkpoint_every=1 if smoke else 25,
        env_config=env_config,
        notes="PPO, masked logits, 64-64 relu",
    )
