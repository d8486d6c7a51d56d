"""Reading datasets: built-ins, image folders, manifests and torchvision sets; images, the input pipeline,
uploads and the data root the dashboard may read under.
"""
