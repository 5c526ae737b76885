"""ZEGO Cloud Recording server API: signing, typed results and errors, and the async client."""
