"""One module per resource; each adds its routes with `setup_routes(app)`."""
