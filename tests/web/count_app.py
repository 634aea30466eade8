"""An app that tells how many server processes offload sees, served with --workers N."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from offload import OffloadSettings
from offload._servers import server_processes
from offload.fastapi import Lifespan

app = FastAPI(lifespan=Lifespan(OffloadSettings(process={"max_workers": 1})))


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/servers")
async def servers() -> dict[str, Any]:
    count, source = server_processes()
    return {"pid": os.getpid(), "servers": count, "source": source}
