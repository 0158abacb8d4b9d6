"""Where the teacher stages send their requests: the configured OpenAI-compatible endpoint, or the project's own
local server (speed_ray.generate.server), started once per pipeline run and stopped when the run ends."""

from __future__ import annotations

from speed_ray.stage import StageContext


def teacher_base_url(ctx: StageContext) -> str:
    """The teacher endpoint; starts the local OpenAI-compatible server when the config asks for one."""
    if ctx.cfg.teacher.base_url:
        return ctx.cfg.teacher.base_url

    def start() -> str:
        from speed_ray.generate.server import start_local_server

        return start_local_server(ctx.cfg.teacher.local_server, ctx.cfg.run, (ctx.cfg.teacher.model,))

    def stop() -> None:
        from speed_ray.generate.server import stop_local_server

        stop_local_server()

    return ctx.services.get("the local teacher server", start, stop)
