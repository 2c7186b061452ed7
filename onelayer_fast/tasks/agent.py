"""`agent`: a multi-turn key-and-door corridor, a small text environment for GiGPO-style agent training.

The agent stands on a 1-D corridor of `size` cells (0 .. size-1) with a key and a door on other cells:

    observation   at 2; key at 4; door at 0; has key: no          ("key at -" once the key is held)
    prompt        at 2; key at 4; door at 0; has key: no. act:
    actions       left | right | pick | open     (the first word of the reply, case-insensitive, or
                                                  any prefix of one: "l", "Ri", "OPEN!" all count)
    dynamics      left / right move one cell (a wall stops them); pick takes the key when standing on
                  it; open ends the episode with reward 1 when standing on the door holding the key.
                  Anything else, or an action with no effect, wastes the turn.
    end           success, or `max_turns` turns used (reward 0)

Start states (agent, key, door on distinct cells) are split into train, val and test by a stable hash
(base.assign_split), so no start state (and so no prompt) is in two splits; test is the split that was
called "eval" before val existed, unchanged. The default corridor (size 5, 60 start states) gives 8
test, 1 val and 51 train start states (val_share=0.2 would give val 7).

The Task view: `sample` gives Examples whose prompt is the first turn's prompt, whose answer is an
optimal action sequence (one action per line) and whose meta holds the start state; a completion is a
transcript, one action per line, and `correct` replays it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .base import VAL_SHARE, Example, Splits, assign_split, check_split

ACTIONS = ("left", "right", "pick", "open")
INVALID = "?"  # how a wasted, unparseable action appears in a transcript
_WORD = re.compile(r"[a-z]+")


def parse_action(text: str) -> str | None:
    """The action named by the first word of `text` (a full name or a prefix of one), else None."""
    match = _WORD.search(text.lower())
    if match is None:
        return None
    word = match.group(0)
    named = [action for action in ACTIONS if action.startswith(word)]
    return named[0] if len(named) == 1 else None


@dataclass(frozen=True)
class StartState:
    agent: int
    key: int
    door: int

    @property
    def key_string(self) -> str:
        return f"a{self.agent}k{self.key}d{self.door}"


class KeyDoorEnv:
    """One episode at a time: reset(example) -> observation; step(action_text) -> (observation, reward, done)."""

    def __init__(self, size: int = 5, max_turns: int = 12, invalid_reward: float = 0.0):
        self.size, self.max_turns, self.invalid_reward = size, max_turns, invalid_reward
        self.done = True

    def reset(self, example: Example) -> str:
        meta = example.meta
        self.position, self.key, self.door = meta["agent"], meta["key"], meta["door"]
        self.has_key = self.opened = self.done = False
        self.turns = 0
        return self.observation()

    def observation(self) -> str:
        key = "-" if self.has_key else str(self.key)
        return f"at {self.position}; key at {key}; door at {self.door}; has key: {'yes' if self.has_key else 'no'}"

    def step(self, action_text: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset() first")
        action = parse_action(action_text)
        reward = 0.0
        if action is None:
            reward = self.invalid_reward
        elif action == "left":
            self.position = max(0, self.position - 1)
        elif action == "right":
            self.position = min(self.size - 1, self.position + 1)
        elif action == "pick":
            if self.position == self.key and not self.has_key:
                self.has_key = True
        elif self.position == self.door and self.has_key:  # open
            self.opened = True
            reward = 1.0
        self.turns += 1
        self.done = self.opened or self.turns >= self.max_turns
        return self.observation(), reward, self.done


def optimal_actions(start: StartState) -> list[str]:
    def walk(src: int, dst: int) -> list[str]:
        return ["right" if dst > src else "left"] * abs(dst - src)

    return walk(start.agent, start.key) + ["pick"] + walk(start.key, start.door) + ["open"]


class AgentTask:
    """Key-and-door corridor as a Task (transcript in, success out) and an environment factory."""

    name = "agent"

    def __init__(self, size: int = 5, max_turns: int = 12, invalid_reward: float = 0.0, eval_share: float = 0.1,
                 val_share: float = VAL_SHARE):
        if size < 3:
            raise ValueError(f"size must be >= 3 (agent, key and door need their own cells), got {size}")
        worst = max(len(optimal_actions(s)) for s in self._all_starts(size))
        if max_turns < worst:
            raise ValueError(f"max_turns {max_turns} is below the {worst} turns some start states need")
        self.size, self.max_turns, self.invalid_reward = size, max_turns, invalid_reward
        self.reward_funcs = [self.success_reward]
        self.reward_weights = [1.0]
        # eval_share is the test split's share of the hash range (its old name, kept for callers).
        self.starts: Splits = Splits({"train": [], "val": [], "test": []}, source=f"agent task (size {size})",
                                     what="start state")
        for start in self._all_starts(size):
            self.starts[assign_split(f"agent:{size}:{start.key_string}", eval_share, val_share)].append(start)
        for split, starts in self.starts.items():
            if not starts:
                raise ValueError(f"size {size} leaves no {split} start states; use a larger corridor")

    @staticmethod
    def _all_starts(size: int) -> list[StartState]:
        cells = range(size)
        return [StartState(a, k, d) for a in cells for k in cells for d in cells if len({a, k, d}) == 3]

    def make_env(self) -> KeyDoorEnv:
        return KeyDoorEnv(self.size, self.max_turns, self.invalid_reward)

    def prompt(self, observation: str) -> str:
        """The text the model sees on a turn: the observation and a short cue."""
        return f"{observation}. act:"

    def example(self, start: StartState) -> Example:
        env = self.make_env()
        meta = {"agent": start.agent, "key": start.key, "door": start.door}
        observation = env.reset(Example("", "", meta))
        return Example(prompt=self.prompt(observation), answer="\n".join(optimal_actions(start)), meta=meta)

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Example]:
        return [self.example(rng.choice(self.starts[check_split(split)])) for _ in range(n)]

    def success_reward(self, transcript: str, example: Example) -> float:
        """1.0 when playing the transcript's lines as actions from the example's start state opens the door."""
        env = self.make_env()
        env.reset(example)
        for line in transcript.split("\n"):
            _, _, done = env.step(line)
            if done:
                break
        return 1.0 if env.opened else 0.0

    def correct(self, transcript: str, example: Example) -> bool:
        return self.success_reward(transcript, example) == 1.0
