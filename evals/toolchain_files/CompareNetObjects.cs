// Stands in for the NuGet package KellermanSoftware.CompareNetObjects, which every MBCSP test calls
// as `new CompareLogic().Compare(actual, expected).AreEqual` and which Debian does not ship.
// Written for the harness, with the package's default comparison: values of the same runtime type,
// collections and dictionaries element by element in enumeration order, other objects by their
// public fields and readable properties, floating point exactly.
using System;
using System.Collections;
using System.Reflection;

namespace KellermanSoftware.CompareNetObjects
{
    public class ComparisonResult
    {
        public ComparisonResult(bool areEqual) { AreEqual = areEqual; }

        public bool AreEqual { get; private set; }

        public string DifferencesString { get { return AreEqual ? "" : "the objects differ"; } }
    }

    public class CompareLogic
    {
        // Deeper than any MBCSP value; a cyclic object graph ends here as unequal.
        const int MaxDepth = 64;

        public ComparisonResult Compare(object first, object second)
        {
            return new ComparisonResult(Same(first, second, 0));
        }

        static bool Same(object a, object b, int depth)
        {
            if (a == null || b == null) return a == null && b == null;
            Type type = a.GetType();
            if (type != b.GetType() || depth > MaxDepth) return false;
            if (IsValue(type)) return a.Equals(b);
            if (a is IDictionary) return SameSequence(Entries((IDictionary)a), Entries((IDictionary)b), depth);
            if (a is IEnumerable) return SameSequence((IEnumerable)a, (IEnumerable)b, depth);
            return SameMembers(a, b, type, depth);
        }

        static bool IsValue(Type type)
        {
            return type.IsPrimitive || type.IsEnum || type == typeof(string) || type == typeof(decimal)
                || type == typeof(DateTime) || type == typeof(TimeSpan) || type == typeof(Guid)
                || type == typeof(System.Numerics.BigInteger);
        }

        static IEnumerable Entries(IDictionary dictionary)
        {
            foreach (DictionaryEntry entry in dictionary)
            {
                yield return entry.Key;
                yield return entry.Value;
            }
        }

        static bool SameSequence(IEnumerable a, IEnumerable b, int depth)
        {
            IEnumerator left = a.GetEnumerator(), right = b.GetEnumerator();
            while (true)
            {
                bool hasLeft = left.MoveNext(), hasRight = right.MoveNext();
                if (hasLeft != hasRight) return false;
                if (!hasLeft) return true;
                if (!Same(left.Current, right.Current, depth + 1)) return false;
            }
        }

        static bool SameMembers(object a, object b, Type type, int depth)
        {
            foreach (FieldInfo field in type.GetFields(BindingFlags.Public | BindingFlags.Instance))
            {
                if (!Same(field.GetValue(a), field.GetValue(b), depth + 1)) return false;
            }
            foreach (PropertyInfo property in type.GetProperties(BindingFlags.Public | BindingFlags.Instance))
            {
                if (!property.CanRead || property.GetIndexParameters().Length > 0) continue;
                if (!Same(property.GetValue(a, null), property.GetValue(b, null), depth + 1)) return false;
            }
            return true;
        }
    }
}
