"""Pipeline steps, one module per DAG: ``training``, ``encoding``, ``monitoring``.

Each step is plain Python with no Airflow import; a DAG task or a CLI command calls one step.
"""
