"""Online masking: BASNet behind an HTTP API on Ray Serve, with a web page and a Python client.

``config`` (the options), ``http`` (the API's requests and answers: parameters, bodies, errors;
no Ray), ``page.html`` (the web page at ``GET /``) and ``ray_app`` (the Serve deployment, its
application builder and the job's start-up, the only part that needs Ray). A served mask goes
through the same decode, predict and render steps as the bulk-masking job's. Design: docs/serve.md.
"""
