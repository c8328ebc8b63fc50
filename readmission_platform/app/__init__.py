"""The clinician's app (Streamlit): one encounter's risk and what drove it, a CSV scored, the model card, recent
predictions. Every answer comes from the BentoML service over HTTP (`client.py`); `readmission app` starts it."""
