"""DQN as in the paper (dueling, double Q), masking with exactly −inf in the Q values.

Run:
    rap train --config rllib_configs/dqn.py --out runs/dqn            # full run
    rap train --config rllib_configs/dqn.py --smoke --out /tmp/dqn    # CI: 2 iterations
    RAY_ADDRESS=ray://head:10001 rap train --config ... --env-runners 8   # on a Ray cluster

`rap.agent.modules.MaskedDQNTorchRLModule` sets Q(s, a) = −inf for masked actions after the
dueling combination, for observations and next observations (DESIGN.md's trap: RLlib's masking
example is PPO-only). Env runners split the training scenarios and sample in parallel; a
prioritized episode replay buffer lives in the Algorithm checkpoint (out/checkpoints/, never
committed): only out/policy/ (the RLModule folder and its plain export) is worth keeping.
Expect: returns climb from about −9 (random removals) toward −1 over 30K env steps (epsilon
decays over the first 15K), noisier than PPO; PPO is the default policy (docs/results.md has
both). On a small shared machine add `--env-runners 0` (sampling in the driver: Ray's worker
processes run at low priority and starve beside other work).
"""

from __future__ import annotations

import os

from ray.rllib.algorithms.dqn import DQNConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rap.agent.env import ServingSimEnv
from rap.agent.modules import MaskedDQNTorchRLModule
from rap.agent.train import TrainSpec

HIDDEN = [64, 64]


def make(smoke: bool = False, env_runners: int | None = None) -> TrainSpec:
    runners = env_runners if env_runners is not None else (0 if smoke else 2)
    env_config = {
        "model": "smollm2",
        "dtype": "float16",
        "split": "train",
        "scores": os.environ.get("RAP_TRAIN_SCORES", "oneshot"),
        "quality": "additive" if smoke else "surrogate",
        "per_worker": runners,
        "pool_size": 60 if smoke else 400,
    }
    steps = 200 if smoke else 30_000
    config = (
        DQNConfig()
        .environment(ServingSimEnv, env_config=env_config)
        .env_runners(num_env_runners=runners, num_envs_per_env_runner=1 if smoke else 8)
        .learners(num_learners=0)
        .reporting(min_sample_timesteps_per_iteration=100 if smoke else 1000)
        .training(
            lr=5e-4,
            gamma=1.0,
            train_batch_size_per_learner=64,
            double_q=True,
            dueling=True,
            num_atoms=1,
            n_step=1,
            target_network_update_freq=100 if smoke else 1000,
            num_steps_sampled_before_learning_starts=100 if smoke else 2000,
            epsilon=[(0, 1.0), (steps // 2, 0.02)],
            replay_buffer_config={
                "type": "PrioritizedEpisodeReplayBuffer",
                "capacity": 50_000,
                "alpha": 0.6,
                "beta": 0.4,
            },
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=MaskedDQNTorchRLModule,
                model_config={
                    "fcnet_hiddens": HIDDEN,
                    "fcnet_activation": "relu",
                    "head_fcnet_hiddens": [],
                },
            )
        )
        .debugging(seed=0)
    )
    return TrainSpec("dqn", config, iterations=2 if smoke else steps // 1000,
                     checkpoint_every=1 if smoke else 10, env_config=env_config,
                     notes="DQN, dueling + double Q, −inf masking, 64-64 relu")  # fmt: skip
