"""The embedded demo: training through Airflow, then the drift loop, on the digits."""
