"""A FastAPI backend that enqueues jobs and relays their tokens to the browser as Server-Sent Events."""
