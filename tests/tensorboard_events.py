"""Reading a TensorBoard folder's summary values back (TFRecord framing, no TensorFlow)."""

import os


def summary_values(folder):
    """Yields (step, summary value) for every value of every event file in `folder`."""
    from tensorboardX.proto.event_pb2 import Event

    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        position = 0
        while position < len(data):  # length, crc, event, crc
            length = int.from_bytes(data[position:position + 8], "little")
            event = Event.FromString(data[position + 12:position + 12 + length])
            position += 16 + length
            for value in event.summary.value:
                yield event.step, value
