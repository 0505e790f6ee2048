"""Which chain serves a preset on this deployment, from the workers' own model reports.

A chain is served when a live worker consuming the chain's queue reports every model of
the chain as installed. A queue with no live worker is judged by its last worker's report,
kept for STEMS_SERVED_MEMORY_S: a GPU pool that its autoscaler scaled to zero still serves
its presets, so their jobs are accepted and queued, and the queue's load list (what the
autoscaler reads) brings a worker up. Before any worker has reported (a fresh deployment),
the API's own view of the model store stands in, so the listing is still truthful about weights.
"""

from __future__ import annotations

import time

from pipelines.errors import PresetError
from pipelines.install_hint import preset_hint
from pipelines.licences import refused_models
from pipelines.presets import Chain, Preset
from stems.models import WorkerReport

from .deps import Services

_CACHE_S = 2.0


class Availability:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._workers: list[WorkerReport] = []
        self._served: dict[str, WorkerReport] = {}
        self._at = 0.0

    def _reports(self) -> tuple[list[WorkerReport], dict[str, WorkerReport]]:
        """The live workers' reports, and each queue's last report (see `RunStore.served`)."""
        if time.monotonic() - self._at > _CACHE_S:
            store = self.svc.store
            self._workers, self._served = store.live_workers(), store.served(self.svc.settings.served_memory_s)
            self._at = time.monotonic()
        return self._workers, self._served

    def chain_missing(self, chain: Chain) -> list[str]:
        """Model ids of `chain` that no worker of its queue holds (empty: served)."""
        return self._missing(list(chain.model_ids), chain.queue)

    def model_served(self, model_id: str) -> bool:
        """Whether a worker of the model's queue holds `model_id` (a prompt-guided model, say)."""
        from pipelines.registry import get_spec

        return not self._missing([model_id], get_spec(model_id).queue)

    def _missing(self, model_ids: list[str], queue: str) -> list[str]:
        live, served = self._reports()
        if not live and not served:  # nobody reported yet: judge by the model store we can see
            from pipelines.registry import get_spec

            return [m for m in model_ids if self.svc.models.missing(get_spec(m))]
        # a pool at zero has no live worker: its last report says what it serves when it scales up
        workers = [w for w in live if queue in w.queues] or ([served[queue]] if queue in served else [])
        if not workers:
            return list(model_ids)
        return min(([m for m in model_ids if m not in w.models] for w in workers), key=len)

    def licence_refused(self, preset: Preset) -> list[str]:
        """Models of `preset`'s chains whose licence does not allow the declared use (STEMS_DECLARED_USE)."""
        return refused_models([m for c in preset.chains for m in c.model_ids], self.svc.settings.declared_use)

    def _allowed(self, preset: Preset) -> list[tuple[int, Chain]]:
        refused = set(self.licence_refused(preset))
        return [(i, c) for i, c in enumerate(preset.chains) if not refused & set(c.model_ids)]

    def install_hint(self, preset: Preset) -> str | None:
        """The command that makes `preset` available here (see `pipelines.install_hint.preset_hint`)."""
        return preset_hint([self.chain_missing(chain) for _, chain in self._allowed(preset)])

    def pick(self, preset: Preset) -> tuple[int, Chain]:
        gaps = []
        for index, chain in self._allowed(preset):
            gap = self.chain_missing(chain)
            if not gap:
                return index, chain
            gaps.append(gap)
        missing = sorted({m for gap in gaps for m in gap})
        hint = preset_hint(gaps)
        refused = self.licence_refused(preset)
        why = (
            f"; chains of {refused} are skipped: their licence does not allow "
            f"{self.svc.settings.declared_use} use (STEMS_DECLARED_USE)"
            if refused
            else ""
        )
        raise PresetError(
            f"preset {preset.name!r} is not available on this deployment: no worker holds models {missing}"
            + (f"; on a worker serving the preset's queue run: {hint}" if hint else "")
            + why,
            preset=preset.name,
            missing_models=missing,
            install_hint=hint,
            licence_refused=refused,
        )
