// The only script of the review page: shift-click selects a range of faces.
let last = null;
document.addEventListener("click", (event) => {
  const box = event.target.closest("input[type=checkbox][name=face]");
  if (!box) return;
  const boxes = [...document.querySelectorAll("input[type=checkbox][name=face]")];
  if (event.shiftKey && last !== null) {
    const [a, b] = [boxes.indexOf(last), boxes.indexOf(box)].sort((x, y) => x - y);
    boxes.slice(a, b + 1).forEach((other) => { other.checked = box.checked; });
  }
  last = box;
});
