"""`/docs` without a CDN: Swagger UI served from the vendored copy in `shared/static/swagger-ui`.

FastAPI's default `/docs` page loads Swagger UI's JavaScript and CSS from a CDN,
which fails on an air-gapped network. Create the app with `docs_url=None,
redoc_url=None` and call `install_offline_docs(app)`. ReDoc is not offered (one
documentation UI is enough and it would need another 1 MB bundle).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_UI_DIR = Path(__file__).parent / "static" / "swagger-ui"
ASSETS_PATH = "/docs-assets"
DOCS_PATH = "/docs"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"


def install_offline_docs(app: FastAPI) -> None:
    if app.docs_url is not None:
        raise ValueError("create the app with docs_url=None: install_offline_docs serves /docs")
    app.mount(ASSETS_PATH, StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        # Honour a reverse proxy's root_path, as FastAPI's own /docs does.
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_PATH,
            # validatorUrl=null: never send the schema to the public online validator.
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False},
        )

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
