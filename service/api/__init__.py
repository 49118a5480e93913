"""The REST API's parts: dependencies (`deps`), request bodies (`body`), response models
(`models`) and the routers (`routes`); `service.app.create_app` puts them together."""
