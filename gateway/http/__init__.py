"""The REST API (FastAPI), served by uvicorn inside the gateway's own event loop."""
