"""The OHIF viewer bundled in monailabel shows every failed inference as "Failed to Run Segmentation", whatever
the server said. This serves its MONAI Label panel's script with the server's message appended to that toast,
so that a user sees why (a series of another modality, a PACS that did not answer). Nothing else changes."""

from __future__ import annotations

import logging

from fastapi import Depends
from fastapi.responses import Response
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC

from .compat import OHIF_TOAST as TOAST
from .compat import ohif_panel

logger = logging.getLogger(__name__)
# the error that monailabel's OHIF client returns holds the response body as an ArrayBuffer
WITH_DETAIL = ("message: 'Failed to Run Segmentation' + (function (r) { try { var d = r && r.response && "
               "r.response.data; var t = d ? new TextDecoder().decode(d) : ''; try { t = JSON.parse(t).detail || t; } "
               "catch (e) {} return t ? ': ' + t : ''; } catch (e) { return ''; } })(response),")


def patched_panel() -> tuple[str, str] | None:
    """(file name, patched script) of the bundle that holds the toast, or None if this OHIF build has none."""
    found = ohif_panel()
    return (found[0], found[1].replace(TOAST, WITH_DETAIL)) if found else None


def serve_error_details(server) -> bool:
    """Registers the patched script ahead of monailabel's /ohif/ route on the FastAPI ``server``."""
    found = patched_panel()
    if found is None:
        logger.warning("OHIF's MONAI Label panel script was not found; its error toasts stay generic")
        return False
    name, script = found
    path = f"{settings.MONAI_LABEL_API_STR}/ohif/{name}"
    if any(getattr(r, "path", None) == path for r in server.router.routes):
        return True
    body = script.encode("utf-8", errors="surrogateescape")

    async def panel_script():
        return Response(body, media_type="application/javascript")

    # the same access rule as monailabel's own /ohif/ route
    server.router.routes.insert(0, APIRoute(path, panel_script, methods=["GET"], include_in_schema=False,
                                            dependencies=[Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))]))
    return True
